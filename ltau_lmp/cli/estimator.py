"""Sub-commands ``build-estimator``, ``predict`` and ``info``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ltau_lmp.cli.options import add_model_options, load_model_option
from ltau_lmp.errors import ConfigError, FileFormatError


def register(sub: argparse._SubParsersAction) -> None:
    from ltau_lmp.estimator.calibration import DEFAULT_FALSE_ALARM_RATE
    from ltau_lmp.estimator.index import DEFAULT_KIND, KIND_CHOICES, OPTION_DEFAULTS
    from ltau_lmp.estimator.index_tuning import AUTO_RECALL, SMALL_LIMIT, SMALL_RECALL, SMALL_SPEEDUP
    from ltau_lmp.estimator.options import DEFAULT_K, WEIGHTINGS

    hnsw, ivf, ivfpq = OPTION_DEFAULTS["hnsw"], OPTION_DEFAULTS["ivf"], OPTION_DEFAULTS["ivfpq"]
    p = sub.add_parser(
        "build-estimator",
        help="build an LTAU estimator from a training-error log and latent descriptors",
        description=(
            "Build an LTAU estimator: the per-atom force-error distributions logged during training "
            "(an error-log .npz written by `ltau-lmp train` or ErrorLog.save) are attached to the "
            "latent descriptors of the same training atoms (an (n_atoms, dim) .npy from the final "
            "model, same atom order), and a faiss nearest-neighbour index is built over the descriptors. "
            "With --reference-descriptors (held-out in-domain atoms, e.g. the reference_descriptors.npy "
            "`ltau-lmp train` writes from its validation structures) it also stores their kNN distances, "
            "which calibrate the per-atom out-of-domain p-value `ood`, and prints recommended alarm "
            "thresholds for --false-alarm-rate."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--error-log", required=True, type=Path, help="error-log .npz")
    p.add_argument("--descriptors", type=Path,
                   help="training-atom descriptors .npy (n_atoms x dim); without it they are computed by --model "
                        "on --train-set (e.g. for a deployed archive of the model that was trained)")
    p.add_argument("--reference-descriptors", type=Path,
                   help="held-out in-domain atoms' descriptors .npy (same model, not in --descriptors)")
    p.add_argument("--reference-set", type=Path,
                   help="held-out in-domain structures (an ASE-readable file, e.g. reference_set.xyz): their "
                        "descriptors computed by --model, instead of --reference-descriptors")
    p.add_argument("--train-set", type=Path,
                   help="the training structures in atom-id order (the train_set.xyz of a training run): without "
                        "--reference-descriptors, index auto tunes its search on whole structures held out of it")
    p.add_argument("--false-alarm-rate", type=float, default=DEFAULT_FALSE_ALARM_RATE,
                   help="in-domain false-alarm rate per evaluation of all watched atoms (halt auto)")
    p.add_argument("-o", "--output", required=True, type=Path, help="estimator directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier estimator at --output")
    p.add_argument("--index", default=DEFAULT_KIND, choices=KIND_CHOICES,
                   help="search backend: exact 'flat', inverted lists 'ivf', graph 'hnsw', compressed "
                        f"'ivfpq'; auto races IVF and HNSW tuned on held-out atoms (--reference-descriptors, else "
                        f"whole structures of --train-set): below {SMALL_LIMIT:,} entries one replaces exact search "
                        f"only at recall@10 >= {SMALL_RECALL} and {SMALL_SPEEDUP:g}x its speed, above that the "
                        f"fastest at recall@10 >= {AUTO_RECALL}; what it chose and why is stored (ltau-lmp info)")
    p.add_argument("-k", "--neighbors", type=int, default=DEFAULT_K, help="neighbours averaged per query")
    p.add_argument("--weighting", default=WEIGHTINGS[0], choices=WEIGHTINGS,
                   help="average neighbour PDFs equally or by inverse distance")
    unset = argparse.SUPPRESS  # index options left out take the kind's own default
    p.add_argument("--hnsw-m", type=int, default=unset, help=f"HNSW graph degree M (default {hnsw['M']})")
    p.add_argument("--ef-construction", type=int, default=unset,
                   help=f"HNSW build effort (default {hnsw['ef_construction']})")
    p.add_argument("--ef-search", type=int, default=unset, help=f"HNSW search effort (default {hnsw['ef_search']})")
    p.add_argument("--nlist", type=int, default=unset, help="IVF / IVF-PQ number of lists (default ~sqrt(n))")
    p.add_argument("--nprobe", type=int, default=unset,
                   help=f"IVF / IVF-PQ lists probed per query (default {ivf['nprobe']} / {ivfpq['nprobe']})")
    binding = p.add_mutually_exclusive_group()
    binding.add_argument("--model", type=Path,
                         help="the model that produced the descriptors: its card (family, species, latent, hash) "
                              "is recorded, so fix ltau and the calculator refuse any other model (required "
                              "unless --unchecked-model)")
    binding.add_argument("--unchecked-model", action="store_true",
                         help="build without the model: any model with the same latent width is then accepted, "
                              "and the estimator says 'unchecked' (ltau-lmp info, fix ltau)")
    add_model_options(p)
    p.add_argument("--threads", type=int, help="faiss threads")
    p.set_defaults(func=_build)

    p = sub.add_parser(
        "predict",
        help="per-atom uncertainty for new latent descriptors",
        description=(
            "Query an LTAU estimator: for each descriptor row, average the error distributions of the "
            "k nearest training atoms and report the expected force error (eV/Angstrom), a confidence "
            "interval, P(error < tol), the mean kNN distance (large = far from the training data) and, "
            "for a calibrated estimator, the out-of-domain p-value ood (small = unusual)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("estimator", type=Path, help="estimator directory")
    p.add_argument("--descriptors", required=True, type=Path, help="query descriptors .npy (n x dim)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .npz or .csv")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier predict output at --output")
    p.add_argument("-k", "--neighbors", type=int, help="override the estimator's k")
    p.add_argument("--ci", nargs=2, type=float, default=(0.05, 0.95), metavar=("LO", "HI"),
                   help="quantile levels of the confidence interval")
    p.add_argument("--tol", type=float, default=0.1, help="tolerance for P(error < tol), eV/Angstrom")
    p.add_argument("--threads", type=int, help="faiss threads")
    p.set_defaults(func=_predict)

    p = sub.add_parser("info", help="describe an estimator directory, an error-log file or a model file",
                       description="Print, as JSON, what an LTAU estimator directory holds (with the card of "
                                   "the model it was built for), what an error-log .npz holds, or the card "
                                   "of a model file (family, species, cutoff, receptive field, latent, hash). "
                                   f"Lists longer than {LIST_LIMIT} values are summarised unless --full.")
    p.add_argument("path", type=Path, help="estimator directory, error-log .npz or model file")
    p.add_argument("--full", action="store_true", help="print long lists (e.g. training-structure indices) whole")
    add_model_options(p)
    p.set_defaults(func=_info)


UNCHECKED_WARNING = ("WARNING: model binding unchecked: this estimator records no model hash, so any model with "
                     "the same latent width is accepted; rebuild it with --model FILE")
LIST_LIMIT = 8  # `info` shows longer lists as a count with their first and last values


def _summarise_lists(value):
    """``value`` with every list longer than ``LIST_LIMIT`` replaced by a one-line description, so
    that `info` fits a screen (an estimator from `train` lists every training-structure index)."""
    if isinstance(value, dict):
        return {key: _summarise_lists(item) for key, item in value.items()}
    if isinstance(value, list):
        if len(value) <= LIST_LIMIT:
            return [_summarise_lists(item) for item in value]
        head = ", ".join(json.dumps(item) for item in value[:3])
        tail = ", ".join(json.dumps(item) for item in value[-2:])
        return f"{len(value)} values: [{head}, ..., {tail}] (--full lists them)"
    return value


def _json(value, level: int = 0) -> str:
    """Indented JSON with lists of plain values on one line (``indent=2`` puts each on its own)."""
    pad = "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(key)}: {_json(item, level + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(pad + _json(item, level + 1) for item in value) + "\n" + "  " * level + "]"
    return json.dumps(value)


def _predict_output(path: Path) -> bool:
    """Whether ``path`` is an earlier `ltau-lmp predict` output (``--overwrite`` may replace it)."""
    import zipfile

    from ltau_lmp.outputs import head_contains

    if path.suffix.lower() == ".csv":
        return head_contains("# expected,")(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return {"expected.npy", "ci_levels.npy", "tol.npy"} <= set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _load_npy(path: Path, what: str):
    """A 2-D .npy, memory-mapped: 10^7 x 256 float32 descriptors are 10 GB that the index build reads
    in chunks, and the page cache can give back (a build then fits 16 GB)."""
    import numpy as np

    if not path.is_file():
        raise FileFormatError(f"{path}: {what} file not found")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise FileFormatError(f"{path}: unreadable {what} .npy ({type(exc).__name__}: {exc})") from None
    if array.ndim != 2:
        raise FileFormatError(f"{path}: {what} must be a 2-D (n, dim) array, got shape {array.shape}")
    return array


def _structure_ids(path: Path, n_rows: int):
    """Structure id of each descriptor row from the training frames in atom-id order (an ASE file)."""
    import numpy as np
    from ase.io import iread

    try:
        sizes = [len(atoms) for atoms in iread(path)]
    except Exception as exc:  # ASE raises many types for unreadable files
        raise FileFormatError(f"{path}: cannot read the training structures ({type(exc).__name__}: {exc})") from None
    if sum(sizes) != n_rows:
        raise ConfigError(f"{path} holds {sum(sizes)} atoms in {len(sizes)} structures but the descriptors have "
                          f"{n_rows} rows: give the training set the descriptors were computed on, in atom-id order")
    return np.repeat(np.arange(len(sizes)), sizes)


def _model_descriptors(model, path: Path, what: str):
    """float32 latents of every atom of the structures in ``path``, computed by ``model``."""
    from ase.io import read

    from ltau_lmp.prediction import predict_frames

    try:
        frames = read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable files
        raise FileFormatError(f"{path}: cannot read the {what} structures ({type(exc).__name__}: {exc})") from None
    print(f"computing the {what} descriptors of {sum(len(a) for a in frames):,} atoms in {len(frames)} structures "
          f"with {model.card.family} model {model.card.model_hash[:12]}", flush=True)
    return predict_frames(model, frames, forces=False).latent


def _build(args) -> int:
    from ltau_lmp.estimator import ErrorLog, EstimatorOptions, LTAUEstimator
    from ltau_lmp.estimator.calibration import describe_thresholds
    from ltau_lmp.outputs import check_dir

    if not args.model and not args.unchecked_model:
        raise ConfigError("give --model FILE (the model that produced the descriptors: fix ltau and the calculator "
                          "then refuse any other model) or --unchecked-model (any model with the same latent "
                          "width is accepted, and the estimator says 'unchecked')")
    check_dir(args.output, "estimator", args.overwrite)
    log = ErrorLog.load(args.error_log)
    model = load_model_option(args.model, args) if args.model else None
    if args.descriptors:
        descriptors = _load_npy(args.descriptors, "descriptors")
    elif model is not None and args.train_set:
        descriptors = _model_descriptors(model, args.train_set, "training")
    else:
        raise ConfigError("give --descriptors FILE.npy, or --model and --train-set to compute them with that model")
    names = {"hnsw_m": "M", "ef_construction": "ef_construction", "ef_search": "ef_search",
             "nlist": "nlist", "nprobe": "nprobe"}
    options = {key: getattr(args, arg) for arg, key in names.items() if hasattr(args, arg)}
    if args.reference_descriptors and args.reference_set:
        raise ConfigError("give --reference-descriptors or --reference-set, not both")
    if args.reference_set and model is None:
        raise ConfigError("--reference-set needs --model to compute its descriptors")
    reference = (_load_npy(args.reference_descriptors, "reference descriptors") if args.reference_descriptors else
                 _model_descriptors(model, args.reference_set, "reference") if args.reference_set else None)
    structures = _structure_ids(args.train_set, len(descriptors)) if args.train_set else None
    metadata = {"units": "eV/Angstrom", "source_error_log": str(args.error_log)}
    if reference is not None:
        metadata["reference_descriptors"] = str(args.reference_descriptors or args.reference_set)
    if model is not None:
        from ltau_lmp.pipeline import card_metadata

        metadata.update(card_metadata(model.card), model_file=str(args.model))
    try:
        choices = EstimatorOptions(index=args.index, k=args.neighbors, weighting=args.weighting,
                                   index_options=options, false_alarm_rate=args.false_alarm_rate)
        est = LTAUEstimator.build(descriptors, log, options=choices, metadata=metadata, threads=args.threads,
                                  reference_descriptors=reference, structures=structures)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    est.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {est.n_entries} entries x {est.dim} dims, {est.nbins} bins, "
          f"index {est.index.kind}, k={est.k}, model binding {est.model_binding}")
    if "choice" in est.index.options:
        print(f"index: {est.index.options['choice']}")
    if est.model_binding == "unchecked":
        print(UNCHECKED_WARNING)
    print(describe_thresholds(est.alarm_thresholds, remedy="give --reference-descriptors"))
    return 0


def _predict(args) -> int:
    import numpy as np

    from ltau_lmp.estimator import LTAUEstimator
    from ltau_lmp.estimator.index import set_threads

    from ltau_lmp.outputs import check_file, output_file

    suffix = args.output.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise ConfigError(f"output must end in .npz or .csv, got {args.output}")
    check_file(args.output, "predict", args.overwrite, _predict_output)
    est = LTAUEstimator.load(args.estimator)
    set_threads(args.threads)
    res = est.query(_load_npy(args.descriptors, "descriptors"), k=args.neighbors)
    try:
        interval = res.interval(*args.ci)
    except ValueError as exc:
        raise ConfigError(f"--ci: {exc}") from None
    columns = {"expected": res.expected, "ci_low": interval[:, 0], "ci_high": interval[:, 1],
               "prob_below_tol": res.prob_below(args.tol), "knn_distance": res.distance}
    if est.has_ood_reference and est.k == res.neighbors.shape[1]:
        columns["ood"] = res.ood
    elif est.has_ood_reference:
        print(f"no ood column: it is calibrated for the estimator's k={est.k}, not -k {args.neighbors}")
    with output_file(args.output, "predict", args.overwrite, _predict_output) as tmp:
        if suffix == ".npz":
            np.savez(tmp, **columns, ci_levels=np.array(args.ci), tol=np.array(args.tol))
        else:
            header = ",".join(columns)
            np.savetxt(tmp, np.column_stack(list(columns.values())), delimiter=",",
                       header=f"{header}  # ci={args.ci[0]}-{args.ci[1]}, tol={args.tol} eV/Angstrom",
                       comments="# ", fmt="%.6g")
    print(f"wrote {args.output}: {len(res)} points, median expected error "
          f"{np.median(res.expected):.4g} eV/Angstrom, max kNN distance {res.distance.max():.4g}")
    return 0


def _info(args) -> int:
    from ltau_lmp.estimator import ErrorLog, LTAUEstimator

    if not args.path.exists():
        raise FileFormatError(f"{args.path}: no such file or directory")
    thresholds = unchecked = None
    if args.path.is_dir():
        summary = {"type": "LTAU estimator", **LTAUEstimator.load(args.path).summary()}
        thresholds, unchecked = summary["alarm_thresholds"], summary["model_binding"] == "unchecked"
    elif args.path.suffix == ".npz":
        summary = {"type": "error log", **ErrorLog.load(args.path).summary()}
    else:  # anything else must be a model file; load_model names what it is not
        from ltau_lmp.model.io import describe_file

        card = load_model_option(args.path, args).card
        summary = {"type": "model", "file": describe_file(args.path), **card.to_dict()}
    print(_json(summary if args.full else _summarise_lists(summary)))
    if unchecked:
        print(UNCHECKED_WARNING)
    if thresholds is not None:   # in words, for the group sizes a user runs (halt auto / dump auto)
        from ltau_lmp.estimator.calibration import describe_thresholds

        print(describe_thresholds(thresholds, remedy=""))
    return 0
