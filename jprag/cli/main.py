"""`jprag` command line: a thin argparse front end over the library.

Sub-commands are registered from the `COMMANDS` table: each entry names the command, its
one-line help, a function that adds its arguments and the handler that runs it. To add a
command, write those two functions and append a `Command` to the table.

Heavy imports (JAX, the model code) happen inside the handlers, so `jprag --help` is fast.
Errors the library raises for bad input (`ValueError`, `FileNotFoundError`) are printed as
``jprag: error: <message>`` with exit status 2; `--debug` re-raises them with a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from typing import Callable, Sequence

from jprag import __version__

PROG = "jprag"

# Errors that mean "the user asked for something that cannot be done", not a bug in jprag.
USER_ERRORS = (ValueError, FileNotFoundError)


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _mesh_axis(text: str) -> int:
    value = int(text)
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or -1 (all remaining devices), got {text}")
    return value


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# --------------------------------------------------------------------------- compilation cache

CACHE_ENV = "JPRAG_CACHE"


def cache_dir() -> pathlib.Path:
    """jprag's cache directory: `$JPRAG_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/jprag`."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return pathlib.Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "jprag"


def enable_compilation_cache() -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache in `cache_dir()/jax`, so a re-run of a command
    loads its compiled programs instead of compiling them again. Call it before anything
    compiles. Leaves an explicit `JAX_COMPILATION_CACHE_DIR` alone; returns the directory used
    (None when the cache directory cannot be created: the command then just compiles)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    path = cache_dir() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


# --------------------------------------------------------------------------- multi-host


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """`--coordinator/--num-processes/--process-id`: join a multi-host job (every process runs the
    same command with its own --process-id; see the README's pod/cluster section)."""
    g = parser.add_argument_group("multi-host (every process runs the same command; default: one process)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0, or 'auto' to let JAX detect the cluster (TPU VM, SLURM); "
                   "default: $JPRAG_COORDINATOR, else a single process")
    g.add_argument("--num-processes", type=_positive_int, default=None, metavar="N",
                   help="processes in the job (default: $JPRAG_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_non_negative_int, default=None, metavar="I",
                   help="this process's index, 0 … N-1; 0 writes indexes and results (default: $JPRAG_PROCESS_ID)")
    g.add_argument("--coordinator-timeout", type=_positive_int, default=None, metavar="S",
                   help="give up joining the job after S seconds (default: 300)")
    g.add_argument("--heartbeat-timeout", type=_positive_int, default=None, metavar="S",
                   help="a process silent for S seconds has failed and the others stop, so a lost host ends "
                   "the job instead of hanging it (default: $JPRAG_HEARTBEAT_TIMEOUT, else 100)")


def dist_config(args: argparse.Namespace):
    """The multi-host settings of a command's flags over `JPRAG_*` variables, checked (a bad
    flag fails here, in well under a second, before JAX starts)."""
    from jprag.distributed import DistConfig

    cfg = DistConfig.from_env(coordinator=getattr(args, "coordinator", None),
                              num_processes=getattr(args, "num_processes", None),
                              process_id=getattr(args, "process_id", None),
                              timeout_s=getattr(args, "coordinator_timeout", None),
                              heartbeat_s=getattr(args, "heartbeat_timeout", None))
    cfg.check()
    return cfg


def start_devices(args: argparse.Namespace) -> None:
    """What every command that trains or answers does before touching a device: the compilation
    cache, then joining the multi-host job its flags (or `JPRAG_*` variables) describe."""
    from jprag.distributed import initialize

    cfg = dist_config(args)
    enable_compilation_cache()
    initialize(cfg)


# --------------------------------------------------------------------------- generation


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="Hugging Face checkpoint directory (config.json + *.safetensors) or a .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=128, metavar="N",
        help="maximum number of tokens to generate (default: 128)",
    )
    parser.add_argument(
        "--temperature", type=_non_negative_float, default=0.0,
        help="sampling temperature; 0 = greedy decoding (default: 0)",
    )
    parser.add_argument(
        "--top-k", type=_non_negative_int, default=0, metavar="K",
        help="sample only among the K most likely tokens; 0 = no limit (default: 0)",
    )
    parser.add_argument(
        "--top-p", type=_probability, default=1.0, metavar="P",
        help="nucleus sampling probability mass; 1 = no limit (default: 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    parser.add_argument(
        "--system", default=None, metavar="TEXT", help="optional system message for the chat template"
    )


def _check_model_path(model: str | None) -> None:
    # Fail fast (before importing JAX) on a path that does not exist.
    if model is not None and not os.path.exists(model):
        raise FileNotFoundError(f"model path not found: {model}")


def _generate_one(prompt: str, args: argparse.Namespace) -> str:
    _check_model_path(args.model)
    enable_compilation_cache()
    from jprag.model.chat import chat_generate, load  # heavy: imports JAX

    return chat_generate(
        [prompt],
        model=load(args.model, weight_dtype=args.weight_dtype),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        system=args.system,
    )[0]


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="user message to answer")
    _add_model_argument(parser)
    parser.add_argument(
        "--weight-dtype", choices=("float32", "bfloat16"), default=None,
        help="store the weight matrices in this dtype and multiply in it, accumulating in float32 "
        "(bfloat16: half the weight memory, faster batched decoding; default: float32 throughout)",
    )
    _add_sampling_arguments(parser)


def _run_generate(args: argparse.Namespace) -> int:
    print(_generate_one(args.prompt, args))
    return 0


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from jprag.cli.run import add_pipeline_arguments

    _add_model_argument(parser)
    add_pipeline_arguments(parser, demo=True)
    add_distributed_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    _check_model_path(args.model)
    from jprag.cli.run import run_demo

    return run_demo(args)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from jprag.cli.run import add_pipeline_arguments

    _add_model_argument(parser)
    add_pipeline_arguments(parser)
    add_distributed_arguments(parser)


def _run_eval(args: argparse.Namespace) -> int:
    _check_model_path(args.model)
    from jprag.cli.run import run_eval

    return run_eval(args)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from jprag.cli.run import add_pipeline_arguments

    parser.add_argument("--config", required=True, metavar="FILE",
                        help="a TOML or JSON RunConfig (see experiments/*.toml); flags override it")
    _add_model_argument(parser)
    add_pipeline_arguments(parser, demo=True)
    add_distributed_arguments(parser)
    parser.set_defaults(out=None)


def _run_run(args: argparse.Namespace) -> int:
    from jprag.cli.run import run_config

    return run_config(args)


def _add_index_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--documents", metavar="FILE.jsonl", help="jprag documents (default: the bundled sample)")
    src.add_argument("--prag-dir", metavar="DIR", help="the published PRAG files")
    parser.add_argument("--kind", choices=("bm25", "dense"), default="bm25")
    parser.add_argument("--out", required=True, metavar="DIR")


def _run_index(args: argparse.Namespace) -> int:
    from jprag.cli.run import run_index

    return run_index(args)


def _add_augment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passages", required=True, metavar="FILE.jsonl", help='lines of {"id", "passage"}')
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    _add_model_argument(parser)


def _run_augment(args: argparse.Namespace) -> int:
    _check_model_path(args.model)
    from jprag.cli.run import run_augment

    return run_augment(args)


# --------------------------------------------------------------------------- encoding


def _add_encode_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("documents (one of)")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--documents", metavar="FILE.jsonl",
                       help="documents in the jprag format (id, passage, rewrite, qa)")
    which.add_argument("--prag-dir", metavar="DIR", help="directory of the published PRAG augmented data")
    source.add_argument("--files", nargs="+", metavar="FILE", default=None,
                        help="with --prag-dir: files relative to DIR (default: the four PRAG evaluation files)")
    source.add_argument("--limit-per-file", type=_positive_int, default=None, metavar="N",
                        help="with --prag-dir: read only the first N questions of each file")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="adapter bank directory; re-running with the same arguments resumes")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing bank in --out first instead of resuming it")
    _add_model_argument(parser)
    lora = parser.add_argument_group("adapters and training (PRAG defaults)")
    lora.add_argument("--rank", type=_positive_int, default=2, help="LoRA rank (default: 2)")
    lora.add_argument("--alpha", type=_positive_float, default=32.0, help="LoRA alpha (default: 32)")
    lora.add_argument("--targets", type=_name_list, default=["gate", "up", "down"], metavar="T,T,...",
                      help="projections to adapt, from q,k,v,o,gate,up,down (default: gate,up,down)")
    lora.add_argument("--lr", type=_positive_float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    lora.add_argument("--epochs", type=_positive_int, default=1, help="passes over each document's samples (default: 1)")
    lora.add_argument("--seed", type=int, default=0, help="seed of the adapters' initialisation (default: 0)")
    lora.add_argument("--cot", action="store_true", help="chain-of-thought samples (full answers)")
    lora.add_argument("--answer-only-loss", action="store_true",
                      help="train on the answer tokens only (default: every token, as PRAG)")
    lora.add_argument("--max-len", type=_positive_int, default=512, metavar="N",
                      help="longest training sample in tokens; longer knowledge text is shortened (default: 512)")
    run = parser.add_argument_group("scheduling")
    run.add_argument("--chunk-size", type=_positive_int, default=32, metavar="D",
                     help="documents trained together (rounded up to a multiple of the data axis; default: 32)")
    run.add_argument("--mesh-data", type=_mesh_axis, default=-1, metavar="N",
                     help="devices on the document axis; -1 = all not used by --mesh-model (default: -1)")
    run.add_argument("--mesh-model", type=_positive_int, default=1, metavar="N",
                     help="devices the base model is sharded over (default: 1)")
    add_distributed_arguments(parser)


def _run_encode(args: argparse.Namespace) -> int:
    _check_model_path(args.model)
    from jprag.cli.encode import run_encode  # reads the documents, then calls enable_compilation_cache

    return run_encode(args)


def _add_export_peft_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bank", required=True, metavar="DIR", help="adapter bank written by `jprag encode`")
    parser.add_argument("--doc", required=True, action="append", metavar="ID",
                        help="document id; repeat to export the merge of several documents' adapters")
    parser.add_argument("--mode", choices=("sum", "mean"), default="sum",
                        help="how several adapters merge: sum of their deltas (PRAG) or mean (default: sum)")
    parser.add_argument("--out", required=True, metavar="DIR", help="PEFT LoRA directory to write")


def _run_export_peft(args: argparse.Namespace) -> int:
    from jprag.cli.encode import run_export_peft  # checks the bank, then calls enable_compilation_cache

    return run_export_peft(args)


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="output directory of `jprag run` / `jprag eval` "
                        "(reads its predictions.jsonl)")
    parser.add_argument("--baseline", default=None, metavar="METHOD",
                        help="method the others are compared against (default: vanilla if it ran, else the first)")
    parser.add_argument("--metric", choices=("f1", "em", "has_answer"), default="f1", help="per-question score (default: f1)")
    parser.add_argument("--resamples", type=_positive_int, default=10_000, help="bootstrap resamples (default: 10000)")
    parser.add_argument("--level", type=_probability, default=0.95, help="confidence level (default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")


def _run_compare(args: argparse.Namespace) -> int:
    from jprag.cli.run import run_compare

    return run_compare(args)


# --------------------------------------------------------------------------- DyPRAG translator


def _add_translator_arguments(parser: argparse.ArgumentParser) -> None:
    from jprag.cli.translator import add_arguments

    add_arguments(parser)


def _run_translator(args: argparse.Namespace) -> int:
    from jprag.cli.translator import run

    return run(args)


# --------------------------------------------------------------------------- command table

COMMANDS: list[Command] = [
    Command("generate", "chat-generate an answer to one prompt with the base model",
            _add_generate_arguments, _run_generate),
    Command("demo", "the end-to-end demo: four methods on the bundled invented-entity sample",
            _add_demo_arguments, _run_demo),
    Command("eval", "answer a question set with each method and score it", _add_eval_arguments, _run_eval),
    Command("run", "run the pipeline from a config file", _add_run_arguments, _run_run),
    Command("compare", "paired bootstrap: is each method's score on a run's questions better than the baseline's",
            _add_compare_arguments, _run_compare),
    Command("index", "build and save a retrieval index (bm25 or dense)", _add_index_arguments, _run_index),
    Command("augment", "rewrite + generate QA pairs for passages with the model itself (cached)",
            _add_augment_arguments, _run_augment),
    Command("encode", "train one LoRA adapter per document into an adapter bank (resumable)",
            _add_encode_arguments, _run_encode),
    Command("export-peft", "write one document's adapter, or the merge of several, as a PEFT LoRA directory",
            _add_export_peft_arguments, _run_export_peft),
    Command("translator", "DyPRAG parameter translator: train one (train), answer with one (eval)",
            _add_translator_arguments, _run_translator),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Parametric retrieval-augmented generation in JAX."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="re-raise errors with a full traceback"
    )
    # Lets `--debug` also follow the sub-command; SUPPRESS keeps the global value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           parents=[common])
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args._run(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only a lost peer of a multi-host job is handled here
        message = _peer_failure(exc)
        if message is None or args.debug:
            raise
        from jprag.distributed import exit_job

        print(f"{PROG}: error: {message}", file=sys.stderr)
        exit_job(1)
    return int(status or 0)


def _peer_failure(exc: BaseException) -> str | None:
    if "jax" not in sys.modules:  # failed before any device was used: not a multi-host failure
        return None
    from jprag.distributed import peer_failure

    return peer_failure(exc)


if __name__ == "__main__":
    raise SystemExit(main())
