"""DyPRAG: a hypernetwork (parameter translator) from document embeddings to LoRAs."""
