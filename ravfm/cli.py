"""`ravfm convert|stats|train|eval|score|serve|synth|submit`: parse, build config, call one function.

Heavy modules are imported inside each command so `ravfm --help` is instant. A UserError
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ravfm.errors import UserError

__all__ = ["main", "build_parser"]


def _convert(a: argparse.Namespace) -> int:
    from ravfm.data.convert import convert

    convert(
        a.format,
        a.src,
        a.out,
        rows_per_shard=a.rows_per_shard,
        split=a.split,
        split_ratios=tuple(a.split_ratios),
        seed=a.seed,
        max_reject_rate=a.max_reject_rate,
        variant=a.variant,
    )
    return 0


def _synth(a: argparse.Namespace) -> int:
    from ravfm.data.synth import synth

    synth(a.dataset, a.rows, a.out, seed=a.seed)
    return 0


def _stats(a: argparse.Namespace) -> int:
    from ravfm.config import FeatureConfig, apply_overrides, from_dict
    from ravfm.features.stats import run_stats

    cfg = from_dict(FeatureConfig, apply_overrides({}, a.overrides))
    run_stats(a.shards, a.out, cfg)
    return 0


def _train(a: argparse.Namespace) -> int:
    from ravfm.config import load_config
    from ravfm.driver import train

    cfg = load_config(a.config, a.overrides)
    train(
        cfg,
        address=a.address,
        resume=a.resume,
        init=a.init_from,
        reset_optimizer=a.reset_optimizer,
    )
    return 0


def _eval(a: argparse.Namespace) -> int:
    from ravfm.driver import evaluate

    evaluate(a.checkpoint, split=a.split, shards=a.shards)
    return 0


def _score(a: argparse.Namespace) -> int:
    from ravfm.scoring import score

    keep = [c for c in (a.keep or "").split(",") if c]
    score(
        a.checkpoint,
        a.input,
        a.output,
        keep=keep,
        address=a.address,
        batch_size=a.batch_size,
        num_actors=a.num_actors,
        split=a.split,
    )
    return 0


def _submit(a: argparse.Namespace) -> int:
    from ravfm.submit import submit

    return submit(a.job, address=a.address, overrides=a.overrides, follow=not a.no_follow)


def _serve(a: argparse.Namespace) -> int:
    from ravfm.serve import main as serve_main

    if a.action == "reload":
        return serve_main.reload_command(
            a.checkpoint, name=a.name, address=a.address, timeout_s=a.timeout
        )
    if a.action == "stop":
        return serve_main.stop_command(name=a.name, address=a.address)
    from ravfm.serve.config import load_serve_config

    flags = {
        "checkpoint": a.checkpoint,
        "name": a.name,
        "host": a.host,
        "port": a.port,
        "replicas": a.replicas,
        "watch_s": a.watch,
    }
    cfg = load_serve_config(a.config, a.overrides, flags)
    return serve_main.start(cfg, address=a.address, detach=a.detach)


_SERVE_ACTIONS = ("start", "reload", "stop")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="online predictions from a checkpoint on Ray Serve")
    actions = sv.add_subparsers(dest="action", required=True)
    address = "Ray cluster address (default: RAY_ADDRESS, else a local cluster in this process)"
    st = actions.add_parser("start", help="deploy a checkpoint (the default action)")
    st.add_argument("--checkpoint", help="runs/NAME/checkpoints (newest step) or a step-* folder")
    st.add_argument("--config", help="YAML file with a serve: section, e.g. jobs/serve_smoke.yaml")
    st.add_argument("--port", type=int, help="HTTP port (default 8000; Serve-wide)")
    st.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for all)")
    st.add_argument("--replicas", type=int, help="model replicas (default 1)")
    st.add_argument("--name", help="Serve application name (default ravfm)")
    st.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=5.0,
        metavar="SECONDS",
        help="roll out newer checkpoints found under --checkpoint (every 5 s by default)",
    )
    st.add_argument("--detach", action="store_true", help="deploy to --address and return")
    st.add_argument("--address", default=None, help=address)
    st.add_argument("overrides", nargs="*", help="serve settings, e.g. serve.max_batch_rows=8192")
    rl = actions.add_parser("reload", help="roll a running app out to another checkpoint")
    rl.add_argument("--checkpoint", required=True)
    rl.add_argument("--name", default="ravfm")
    rl.add_argument("--address", default=None, help=address)
    rl.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for replicas")
    sp = actions.add_parser("stop", help="remove a running app")
    sp.add_argument("--name", default="ravfm")
    sp.add_argument("--address", default=None, help=address)
    sv.set_defaults(fn=_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ravfm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="raw Criteo/Avazu/MovieLens/libSVM files -> Parquet shards")
    c.add_argument("format", choices=["criteo", "avazu", "movielens", "libsvm"])
    c.add_argument("src", help="local path, glob or fsspec URL (file://, http(s)://, s3://, gs://)")
    c.add_argument("--out", required=True, help="output directory for shards and _index.json")
    c.add_argument("--rows-per-shard", type=int, default=1_000_000)
    c.add_argument(
        "--split",
        default="hash",
        help="hash (seeded by row number); train, valid or test (every row to that split, "
        "e.g. a separate test file); or a MovieLens 100K split u1..u5, ua, ub",
    )
    c.add_argument(
        "--split-ratios",
        type=float,
        nargs=3,
        default=[8.0, 1.0, 1.0],
        metavar=("TRAIN", "VALID", "TEST"),
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-reject-rate", type=float, default=0.001)
    c.add_argument(
        "--variant",
        default="auto",
        help="auto-detected; criteo/avazu: train|test; movielens: ml-100k|ml-1m|ml-10m|"
        "ml-20m|ml-25m|latest; libsvm: libsvm|libffm",
    )
    c.set_defaults(fn=_convert)

    s = sub.add_parser("synth", help="synthetic raw data in a real format, with oracle labels")
    s.add_argument("dataset", choices=["criteo", "avazu", "movielens"])
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--out", required=True, help="output file (or directory for movielens)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_synth)

    st = sub.add_parser("stats", help="count hashed ids on train; write feature_spec.json")
    st.add_argument("shards", help="directory holding _index.json and the shards")
    st.add_argument("--out", required=True)
    st.add_argument("overrides", nargs="*", help="feature settings, e.g. hash_bits=22 min_count=10")
    st.set_defaults(fn=_stats)

    t = sub.add_parser("train", help="train a model from a YAML job with key=value overrides")
    t.add_argument("--config", help="YAML job file, e.g. jobs/criteo_fm.yaml")
    t.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else a local cluster started in-process)",
    )
    t.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    t.add_argument(
        "--init-from",
        default=None,
        help="start a NEW run from this checkpoint's weights and optimizer state (warm start on "
        "new data, hashed with the checkpoint's feature spec)",
    )
    t.add_argument(
        "--reset-optimizer", action="store_true", help="with --init-from: fresh optimizer state"
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 model.k=8")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a split of its shards")
    e.add_argument("checkpoint")
    e.add_argument("--split", default="test")
    e.add_argument("--shards", default=None, help="shard directory (default: the run's own)")
    e.set_defaults(fn=_eval)

    sc = sub.add_parser("score", help="batch-score a Parquet dataset with a checkpoint")
    sc.add_argument("--checkpoint", required=True)
    sc.add_argument("--input", required=True, help="Parquet file/dir/URL, or a raw file")
    sc.add_argument("--output", required=True)
    sc.add_argument("--keep", default="", help="comma-separated columns to copy to the output")
    sc.add_argument("--split", default=None, help="score one split of a shard directory")
    sc.add_argument("--batch-size", type=int, default=65536)
    sc.add_argument(
        "--num-actors",
        type=int,
        default=0,
        help="threads (this machine) or Ray actors; 0 = one per CPU",
    )
    sc.add_argument(
        "--address", default=None, help="score on this Ray cluster (default: here, no Ray)"
    )
    sc.set_defaults(fn=_score)

    _add_serve(sub)

    sm = sub.add_parser(
        "submit", help="submit a training (or serve) job to a Ray cluster and follow it"
    )
    sm.add_argument("job", help="YAML job file, e.g. jobs/criteo_fm.yaml")
    sm.add_argument(
        "--address",
        default=None,
        help="dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS)",
    )
    sm.add_argument("--no-follow", action="store_true", help="submit and return at once")
    sm.add_argument("overrides", nargs="*")
    sm.set_defaults(fn=_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"] and (
        len(argv) < 2 or argv[1] not in (*_SERVE_ACTIONS, "-h", "--help")
    ):
        argv.insert(1, "start")  # `ravfm serve --checkpoint ...` is `ravfm serve start ...`
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option, e.g. `stats DIR --out X hash_bits=22`
        if not hasattr(args, "overrides") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        print(f"ravfm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ravfm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
