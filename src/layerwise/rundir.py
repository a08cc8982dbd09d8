"""The run folder: the names of its files, its writer lock, and how a fit may start in it.

One process writes a run folder at a time (an exclusive ``flock`` on ``RUN/.lock``, released
by the kernel when the process dies, even by SIGKILL). A folder that already holds a run is
never overwritten silently: a fit continues it with ``--resume`` or replaces it with
``--overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerwise.checkpoint import TMP_SUFFIX, append_jsonl, atomic_write_text, write_json
from layerwise.errors import LayerwiseError, MissingPathError, read_user_text

if TYPE_CHECKING:
    from layerwise.config import RunConfig
    from layerwise.models import LoadedModel

CONFIG = "config.yaml"
PLAN = "plan.json"
MODEL = "model.json"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
BEST = "best.safetensors"
STATE = "last/state.pt"
PROBE = "probe.json"
PROBE_HEAD = "probe_head.safetensors"  # auto's fitted probe: the fine-tune's starting head
SKIPPED = "skipped.json"
TTA = "tta.json"
TEST = "test.json"  # the best weights on DATA/test: never used for a choice
RACE = "race.json"  # auto's race: the candidates, their rung results, the winner
RACE_DIR = "race"  # one run folder per candidate
BACKBONE = "backbone.json"  # --model auto: each backbone's probe, the one chosen and why
WISE = "wise.json"  # WiSE-FT after auto's race: each mix's val accuracy, the one kept
SOUP = "soup.json"  # a greedy soup: auto's racers, or compare --soup's runs
REPORT = "report.md"
LR_FIND_PNG = "lr_find.png"
FINGERPRINT = "fingerprint.json"
LOG = "train.log"  # compare --quiet: the run's own log
LOCK = ".lock"
# What a fit writes; --overwrite removes exactly these (and the plots), nothing of the user's.
LR_FIND_JSON = "lr_find.json"  # layerwise lr-find
PLOTS = ("curves.png", "lr.png", "trainable.png", "confusion.png")  # the report's, in its order
RUN_FILES = (CONFIG, PLAN, MODEL, METRICS, STEPS, BEST, PROBE, PROBE_HEAD, SKIPPED, TTA, TEST, REPORT, LR_FIND_PNG, FINGERPRINT, LOG,
             RACE, WISE, SOUP, BACKBONE, *PLOTS)
RUN_DIRS = ("last", "tb", RACE_DIR)


class RunExistsError(LayerwiseError):
    """``--out`` already holds a run, and neither ``--resume`` nor ``--overwrite`` was given."""


class RunLockedError(LayerwiseError):
    """Another process is writing the same run folder."""


class RunFileError(LayerwiseError):
    """A run folder's JSON that is damaged, edited or crafted."""


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def model_info(loaded: LoadedModel, cfg: RunConfig, classes: list[str], val_images: int) -> dict[str, Any]:
    """``model.json``: what ``evaluate``/``predict``/``export`` need to rebuild the trained model."""
    return {"source": loaded.source, "arch": loaded.arch, "name": loaded.name, "head": cfg.head, "hidden": cfg.hidden,
            "num_classes": len(classes), "classes": classes, "val_images": val_images, "mean": list(loaded.mean),
            "std": list(loaded.std), "img_size": cfg.img_size}


def holds_run(run: Path) -> bool:
    """Has a fit started here? Its config.yaml (written before the first epoch) or a checkpoint.
    The files a probe writes before config.yaml do not count: a fit stopped there starts again."""
    return (run / CONFIG).exists() or (run / "last").exists()


def remove_own_temp_files(run: Path) -> list[Path]:
    """Delete the temp files this run folder's own atomic writers leave when killed
    (``.NAME.XXXX.tmp`` beside each run file, matched by exact name): nothing of the user's,
    nothing of a run folder below this one. Call it only while holding the folder's lock."""
    removed = []
    for name in {*ROLES.values(), *PLOTS}:
        target = run / name
        if target.parent.is_dir():
            for p in target.parent.glob(f".{target.name}.*{TMP_SUFFIX}"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


# What a fit writes before config.yaml (auto's probe, --lr auto's plot): left by a fit stopped
# before its header, removed when the next fit starts afresh.
BEFORE_HEADER = (PROBE, PROBE_HEAD, BEST, LR_FIND_PNG)


def clear_unstarted(run: Path) -> None:
    """A fresh start in a folder that holds no run: the files of a fit stopped before its
    config.yaml go, so none of them is read as this run's."""
    for name in BEFORE_HEADER:
        (run / name).unlink(missing_ok=True)


def has_checkpoint(run: Path) -> bool:
    return (run / STATE).is_file()


def clear(run: Path) -> None:
    """Remove a previous run's files (``--overwrite``); other files in the folder stay."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run / name, ignore_errors=True)


def refuse_existing(run: Path) -> None:
    if holds_run(run):
        raise RunExistsError(
            f"{str(run)!r} already holds a run; continue it with `layerwise fit --resume {run}`, replace it with "
            "--overwrite, or choose another --out")


@contextlib.contextmanager
def writer_lock(run: Path) -> Iterator[None]:
    """Hold ``run`` for this process only. A folder this call created and left without a
    run in it (a config error, a failed data check) is removed again on the way out, by the
    holder only: a writer refused the lock never unlinks the lock file another one holds."""
    created = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # a file in the way, a read-only folder or disk
        what = "is a file, not a folder" if run.is_file() else f"cannot be written ({e.strerror or e})"
        raise LayerwiseError(f"--out {str(run)!r} {what}; choose another --out, or make it writable "
                             "(a resume writes its checkpoint and logs there too)") from e
    held = False
    try:
        _lock(fd, run)
        held = True
        yield
    finally:
        if held and created and not holds_run(run):
            (run / LOCK).unlink(missing_ok=True)
        os.close(fd)  # releases the lock, after the unlink: no one can lock the file we remove
        if held and created and not holds_run(run):
            with contextlib.suppress(OSError):  # not empty: something of the user's is there
                run.rmdir()


# Settings that change where or how visibly a run executes, not what it computes. (The probe's
# skill and shift do change it: given, they decide auto's choice without a probe.)
NOT_DEFINING = ("out", "quiet", "workers", "device", "cache", "cache_dir", "check_data", "checkpoint_every",
                "resumed", "probe_head")


def data_fingerprint(data: str | None) -> str:
    """A hash of exactly the files the loader reads (path, size, modification time; a CSV's
    too, and every image it lists), in the loader's own listing: files beside the data and
    symlink cycles are never walked, and the same folder with other images hashes differently."""
    from layerwise.data import load_splits

    if data is None:
        return "embedded digits"
    splits = load_splits(data)
    h = hashlib.sha256()
    root = Path(data)
    if root.is_file():
        st = root.stat()
        h.update(f"{root.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    for src, label in sorted((str(s), lb) for s, lb in [*splits.train, *splits.val]):
        with contextlib.suppress(OSError):  # vanished: the data check reports it
            st = os.stat(src)
            h.update(f"{src}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


HEAD_BYTES = 1 << 20  # a weights file is hashed by its size, mtime and first MiB


def weights_fingerprint(weights: str) -> str:
    """A ``--weights FILE`` by content, so a replaced file is a new run; a named set of
    weights (default, none, IMAGENET1K_V2) by its name."""
    path = Path(weights)
    if not path.is_file():
        return weights
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return f"{st.st_size}|{st.st_mtime_ns}|{head}"


def run_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What defines a run's result: its data files, its weights and every setting that changes the training."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_DEFINING}
    return {"data": data_fingerprint(cfg.data), "weights": weights_fingerprint(cfg.weights),
            "config": json.loads(json.dumps(config, default=str))}


def check_same_data(run: Path, data: str | None) -> None:
    """A resume must see the images the run started on: files added, removed or changed since
    would silently become part of a run whose first epochs never saw them."""
    path = run / FINGERPRINT
    try:
        saved = json.loads(path.read_text()).get("data")
    except (OSError, ValueError, RecursionError, AttributeError):
        return  # a run from before fingerprints, or a damaged file: nothing to compare against
    if saved is not None and saved != data_fingerprint(data):
        raise LayerwiseError(f"cannot resume {run}: its data changed since the run started (images added, removed or "
                             f"modified in {data}); restore them, or start a new run with another --out")


def fingerprint_mismatch(run: Path, expected: dict[str, Any]) -> list[str]:
    """Names of what differs between ``run``'s fingerprint and ``expected`` (``[]``: same)."""
    path = run / FINGERPRINT
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return ["fingerprint.json (missing or unreadable)"]
    if not isinstance(saved, dict):
        return ["fingerprint.json (not an object)"]
    diff = ["data files"] if saved.get("data") != expected["data"] else []
    diff += ["weights file"] if saved.get("weights") != expected["weights"] else []
    old, new = saved.get("config") or {}, expected["config"]
    return diff + sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def read_model_info(run: Path) -> dict:
    """``model.json``, checked as untrusted input: a hand-edited or crafted file must not
    crash a command or make it allocate an absurd model or image."""
    from layerwise.config import MAX_CLASSES, MAX_IMG_SIZE, RANGES
    from layerwise.models import HEADS

    path = run / MODEL
    if not path.is_file():
        raise MissingPathError(f"{str(run)!r} is not a layerwise run folder (no model.json); pass the --out of a fit")
    try:
        info = json.loads(read_user_text(path, "run file"))
    except json.JSONDecodeError as e:
        raise RunFileError(f"{str(path)!r} is not valid JSON ({e}); re-run the fit to rewrite it") from e
    except RecursionError as e:  # nested thousands deep: crafted, never written by a fit
        raise RunFileError(f"{str(path)!r} nests too deeply to be a model.json; re-run the fit to rewrite it") from e
    if not isinstance(info, dict):
        raise RunFileError(f"{str(path)!r} must hold a JSON object, got {type(info).__name__}")

    def bad(key: str, want: str) -> RunFileError:
        return RunFileError(f"{str(path)!r}: {key!r} must be {want}, got {info.get(key)!r}; "
                            "the file was edited or damaged, re-run the fit to rewrite it")

    checks = {
        "source": (lambda v: v in ("torchvision", "timm"), "'torchvision' or 'timm'"),
        "arch": (lambda v: isinstance(v, str) and v.isidentifier(), "an architecture name"),
        "head": (lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
        "hidden": (lambda v: _is_int(v) and v in RANGES["hidden"], f"an integer {RANGES['hidden']}"),
        "num_classes": (lambda v: _is_int(v) and 1 <= v <= MAX_CLASSES, f"an integer from 1 to {MAX_CLASSES}"),
        "classes": (lambda v: isinstance(v, list) and len(v) == info.get("num_classes")
                    and all(isinstance(c, str) for c in v), "a list of num_classes names"),
        "img_size": (lambda v: _is_int(v) and 16 <= v <= MAX_IMG_SIZE, f"an integer from 16 to {MAX_IMG_SIZE}"),
        "mean": (lambda v: _floats3(v), "three numbers"),
        "std": (lambda v: _floats3(v) and min(v) > 0, "three positive numbers"),
    }
    for key, (ok, want) in checks.items():
        if key not in info or not ok(info[key]):
            raise bad(key, want)
    return info


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _floats3(v: object) -> bool:
    return (isinstance(v, list) and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e6 for x in v))


@contextlib.contextmanager
def explain_write_errors(run: Path) -> Iterator[None]:
    """A failed write in the run folder (disk full, read-only) becomes a user error that says
    what survived: the atomic writer has left the previous checkpoint in place."""
    try:
        yield
    except OSError as e:
        kept = ("The previous checkpoint is intact" if has_checkpoint(run)
                else "No checkpoint was written yet, so the run will start over")
        raise LayerwiseError(
            f"could not write in {run}: {e.strerror or e}. {kept}; free some space (or make the folder writable), "
            f"then continue with: layerwise fit --resume {run}"
        ) from e


def _lock(fd: int, run: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; a second writer is not detected
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLockedError(
            f"another layerwise process is writing {str(run)!r}; wait for it to finish (or stop it), or choose "
            "another --out") from None


@dataclass(frozen=True)
class RunDir:
    """A run folder's files by role, and its appenders: the one place their names live."""

    root: Path

    def __str__(self) -> str:
        return str(self.root)

    def __getattr__(self, role: str) -> Path:
        """``run.metrics`` -> RUN/metrics.jsonl, for each role of :data:`ROLES`."""
        if role in ROLES:
            return self.root / ROLES[role]
        raise AttributeError(f"a run folder has no file {role!r}; its files are: {', '.join(ROLES)}")

    def append_metrics(self, row: dict) -> None:
        """One epoch's row, appended and fsynced: the log never names an epoch it then loses."""
        with explain_write_errors(self.root):
            append_jsonl(self.metrics, row)

    def append_steps(self, rows: Sequence[dict]) -> None:
        """An epoch's per-step rows, without an fsync (per epoch, off the hot path)."""
        with explain_write_errors(self.root), open(self.steps, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def write_header(self, *, config_text: str, plan: dict, model: dict, fingerprint: dict | None) -> None:
        """The files a fit writes before its first epoch: config, plan, model info, fingerprint."""
        with explain_write_errors(self.root):
            atomic_write_text(self.config, config_text)
            write_json(self.plan, plan)
            write_json(self.model, model)
            if fingerprint is not None:
                write_json(self.fingerprint, fingerprint)

    def model_info(self) -> dict:
        return read_model_info(self.root)


# role -> file name, as RunDir exposes them (run.config, run.best, run.state...)
ROLES = {"config": CONFIG, "plan": PLAN, "model": MODEL, "metrics": METRICS, "steps": STEPS, "best": BEST,
         "state": STATE, "probe": PROBE, "probe_head": PROBE_HEAD, "skipped": SKIPPED, "tta": TTA, "test": TEST, "report": REPORT,
         "race": RACE, "race_dir": RACE_DIR, "wise": WISE, "soup": SOUP, "backbone": BACKBONE,
         "lr_find_png": LR_FIND_PNG, "lr_find_json": LR_FIND_JSON, "fingerprint": FINGERPRINT, "log": LOG,
         "onnx": "model.onnx", "torchscript": "model.torchscript.pt"}  # the last two: layerwise export

SEED_SEP = "-seed"  # compare's run folders with repeats: STRATEGY-seedN


@dataclass(frozen=True)
class CompareDir:
    """``layerwise compare``'s folder: a run folder per strategy and seed, and the summary."""

    root: Path

    def run_for(self, strategy: str, seed: int, repeats: int) -> Path:
        return self.root / (strategy if repeats == 1 else f"{strategy}{SEED_SEP}{seed}")

    @staticmethod
    def strategy_of(run: str | Path) -> str:
        """The strategy a run folder of :meth:`run_for` belongs to."""
        return Path(run).name.split(SEED_SEP)[0]

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def soup(self) -> Path:
        """``compare --soup``'s run folder: the greedy soup of the runs."""
        return self.root / "soup"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def plots(self) -> tuple[Path, Path]:
        return self.root / "compare_val_acc.png", self.root / "compare_time_acc.png"
