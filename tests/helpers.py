"""Helpers shared by several test files (runs, folders, subprocesses, one-line errors)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine import distributed
from bida.models import SegOutput
from bida.tools.cli import main
from fixtures import make_cityscapes_tree, make_folder_tree, make_gta5_tree, make_synthia_tree


TINY = ["model.width=0.125", "train.iters=2", "train.quiet=true", "data.crop=[8,12]", "train.eval_every=100"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (dirs as markers)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def folder_pair(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "data" / "src"
    tgt = tmp_path / "data" / "tgt"
    make_folder_tree(src)
    make_folder_tree(tgt, target_without_train_labels=True)
    return src, tgt


def folder_args(src: Path, tgt: Path) -> list[str]:
    return ["data.source.kind=folder", f"data.source.root={src}", "data.source.val_split=null",
            "data.target.kind=folder", f"data.target.root={tgt}", *TINY]


def run_cli(tmp_path: Path, args: list[str], capsys, needle: str) -> None:
    """Run ``bida ...``; expect exit 2, one stderr line containing ``needle``, nothing changed."""
    before = snapshot(tmp_path)
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("bida: error:") and "\n" not in err, err
    assert needle in err, err
    assert snapshot(tmp_path) == before


def train_args(tmp_path: Path, extra: list[str]) -> list[str]:
    return ["train", "--out", str(tmp_path / "run"), *extra]


TINY_MIT = ["model.backbone=mit_b0", "model.width=0.25", "model.decoder=daformer", "model.decoder_dim=16",
            "model.proj_dim=8", "model.drop_path=0", "train.schedule=teacher", "method.name=self_training",
            "train.student_forwards=separate", "data.crop=[64,64]", "model.hrda.enabled=true",
            "model.hrda.detail_crop=[32,32]"]


def _one_line_error(capsys) -> str:
    """The final stderr line; the announcement a stop signal prints at once is left out."""
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if not line.startswith("bida: stop requested"))
    assert "\n" not in err, err
    return err


TEACHER = ["train.schedule=teacher", "train.iters=4", "train.optimizer=adamw", "train.weight_decay=0.01",
           "train.lr=6e-4", "train.warmup_iters=2", "train.poly_power=1.0", "data.rare_class_sampling=true",
           "data.rcs_min_pixels=2"]


MIXED = ["method=bida", "method.target_features=mixed"]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


LONGEST_CROP = 64


FIXTURE_AREA = 16 * 32


SOURCE_AREA = {"gta5": 1052 * 1914, "synthia": 760 * 1280}


def _scaled(value, factor: float):
    return max(1, int(round(value * factor)))


def shrink(raw: dict) -> list[str]:
    """Overrides that shrink sizes, width and lengths of a config, and nothing else."""
    data, ev = raw.get("data", {}), raw.get("eval", {})
    crop = data.get("crop", [64, 128])
    factor = min(1.0, LONGEST_CROP / max(crop))
    out = [f"data.crop=[{_scaled(crop[0], factor)},{_scaled(crop[1], factor)}]", "model.width=0.125",
           "train.iters=2", "train.rounds=1", "train.iters_per_round=2", "train.eval_every=1000",
           "train.checkpoint_every=1", "train.log_every=1", "train.quiet=true"]
    if data.get("resize"):
        out.append(f"data.resize={_scaled(data['resize'], factor)}")
    for role in ("source", "target"):  # a domain's own shorter side (DAFormer resizes each domain)
        if data.get(role, {}).get("resize"):
            out.append(f"data.{role}.resize={_scaled(data[role]['resize'], factor)}")
    if data.get("rare_class_sampling"):  # full-resolution pixels: scaled by the fixture's image area
        kind = data["source"]["kind"]  # synthetic images shrink with the crop (_domain_overrides)
        area = factor ** 2 if kind == "synthetic" else FIXTURE_AREA / SOURCE_AREA.get(kind, FIXTURE_AREA)
        out.append(f"data.rcs_min_pixels={_scaled(data.get('rcs_min_pixels', 3000), area)}")
    if raw.get("mic", {}).get("block_size"):  # a side in pixels of the crop
        out.append(f"mic.block_size={_scaled(raw['mic']['block_size'], factor)}")
    for key in ("ignore_top", "ignore_bottom"):  # pixel rows of the crop
        if raw.get("pseudo", {}).get(key):
            out.append(f"pseudo.{key}={_scaled(raw['pseudo'][key], factor)}")
    if any(raw.get("pseudo", {}).get("margins", ())):  # pixels of the (resized) image
        out.append(f"pseudo.margins=[{','.join(str(_scaled(m, factor)) for m in raw['pseudo']['margins'])}]")
    hrda = raw.get("model", {}).get("hrda", {})
    if hrda.get("detail_crop"):  # pixels of the crop, shrunk with it (HRDA stays on)
        out.append(f"model.hrda.detail_crop=[{','.join(str(_scaled(s, factor)) for s in hrda['detail_crop'])}]")
    if str(raw.get("model", {}).get("backbone", "")).startswith(("mit_", "dinov2_")):
        out += ["model.decoder_dim=16", "model.proj_dim=16"]
    for key in ("size", "crop", "stride"):
        if ev.get(key):
            out.append(f"eval.{key}=[{_scaled(ev[key][0], factor)},{_scaled(ev[key][1], factor)}]")
    return out


def _domain_overrides(raw: dict, tmp: Path, cache: Path) -> list[str]:
    """Point each domain at a fixture tree of its own kind (or a small synthetic pair)."""
    out = []
    classes = ("ground", "wall", "sky", "object")
    for role in ("source", "target"):
        kind = raw["data"][role]["kind"]
        root = tmp / f"{role}_{kind}"
        if kind == "gta5":
            make_gta5_tree(root, n=3, size=(16, 32), mismatched=1)
        elif kind == "synthia":
            make_synthia_tree(root, n=3, size=(16, 32))
        elif kind == "cityscapes":
            make_cityscapes_tree(root, size=(16, 32), unlabelled_splits=("train",) if role == "target" else ())
        elif kind == "folder":
            make_folder_tree(root, classes=classes, n_train=3, n_val=2, size=(16, 32),
                             target_without_train_labels=role == "target")
        else:
            assert kind == "synthetic"
            syn = raw["data"].get("synthetic", {})
            factor = min(1.0, LONGEST_CROP / max(raw["data"]["crop"]))
            out += ["data.synthetic.num_train=6", "data.synthetic.num_val=3", "data.synthetic.num_test=2",
                    f"data.synthetic.height={_scaled(syn.get('height', 64), factor)}",
                    f"data.synthetic.width={_scaled(syn.get('width', 128), factor)}",
                    f"data.synthetic.cache_dir={cache}"]
            continue
        out.append(f"data.{role}.root={root}")
    return sorted(set(out))


PALETTE = ((250, 0, 0), (0, 250, 0), (0, 0, 250))


def _folder_pair(root: Path, palette=PALETTE, target_classes=("sky", "tree", "house")) -> list[str]:
    make_folder_tree(root / "A", classes=("sky", "tree", "house"), size=(16, 32), palette=palette)
    make_folder_tree(root / "B", classes=target_classes, size=(16, 32), palette=palette,
                     target_without_train_labels=True)
    return ["data.source.kind=folder", f"data.source.root={root / 'A'}",
            "data.target.kind=folder", f"data.target.root={root / 'B'}"]


def _wait_for(predicate, procs, timeout: float = 180.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not predicate():
        for p in procs:
            assert p.poll() is None, (what, p.communicate())
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


HOOK = textwrap.dedent("""
    import os
    if os.environ.get("BIDA_TEST_HOOK"):  # test hook: MODULE:FUNCTION:ACTION:MARKER
        import dataclasses, importlib, signal, time
        from pathlib import Path
        module, function, action, marker = os.environ["BIDA_TEST_HOOK"].split(":", 3)
        mod = importlib.import_module("bida." + module)
        real = getattr(mod, function)
        calls = []
        def hooked(*args, **kwargs):
            Path(f"{marker}-rank{os.environ.get('RANK', '0')}").touch()  # the place was reached
            if action == "slow":
                time.sleep(0.4)
            out = real(*args, **kwargs)
            calls.append(1)
            if action == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            if action == "nan" and os.environ.get("RANK") == "1" and len(calls) == 2:  # a step's StepResult
                out = dataclasses.replace(out, loss=out.loss * float("nan"))
            return out
        setattr(mod, function, hooked)
""")


def _env(tmp_path: Path, hook: str | None = None) -> dict:
    """Environment of a child: short collective timeout, one thread, an optional hook
    (``module:function:action``, action ``slow``, ``term``, or ``nan``: rank 1's second step
    result gets a NaN loss) that marks ``tmp_path/started-rank<r>``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, OMP_NUM_THREADS="1", BIDA_DIST_TIMEOUT_S="90",
               PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("BIDA_TEST_HOOK", None)
    if hook:
        env["BIDA_TEST_HOOK"] = f"{hook}:{tmp_path / 'started'}"
    return env


def _bida(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bida", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kwargs)


WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teacher_run(rank: int, world: int, overrides: list[str], run: str, tag: str, port: int = 0,
                 stop_after: int | None = None, resume: bool = False, head_dropout: bool = True,
                 config: str | None = None) -> None:
    """A teacher run (or its resume) as rank ``rank`` of ``world``; saves what this rank holds
    at the end: the student's and the teacher's state dicts, and how many of the student's
    BatchNorms are synchronised. ``head_dropout=False``: the MiT head's dropout off (each rank
    draws its own masks, which one process does not draw), for comparisons with one process.
    ``config``: a config file under the overrides."""
    from bida.engine.train import Trainer
    from bida.models import heads
    from bida.models.sync_bn import SyncBatchNorm2d

    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), BIDA_DIST_TIMEOUT_S="120")
    torch.set_num_threads(1)
    dropout = heads.DROPOUT
    try:
        heads.DROPOUT = dropout if head_dropout else 0.0
        trainer = Trainer(load_config(config, overrides), Path(run), resume=resume)
        trainer.fit(stop_after=stop_after)
        torch.save({"student": trainer.model.state_dict(), "teacher": trainer.mean_teacher.teacher.model.state_dict(),
                    "sync_bn": sum(isinstance(m, SyncBatchNorm2d) for m in trainer.model.modules())},
                   Path(run).parent / f"{tag}-rank{rank}.pt")
    finally:
        heads.DROPOUT = dropout
        distributed.shutdown()


def _spawn_teacher(overrides: list[str], run: Path, tag: str, **kwargs) -> list[dict]:
    mp.spawn(_teacher_run, args=(WORLD, overrides, str(run), tag, _free_port(), kwargs.get("stop_after"),
                                 kwargs.get("resume", False), kwargs.get("head_dropout", True), kwargs.get("config")),
             nprocs=WORLD, join=True)
    return [torch.load(run.parent / f"{tag}-rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _assert_same_states(a: dict, b: dict, what: str) -> None:
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{what}: {part}.{key}"


TINY_DLV2 = ["model.backbone=resnet18", "model.width=0.125", "train.schedule=teacher", "method.name=self_training",
             "train.student_forwards=separate", "data.crop=[64,64]", "model.hrda.enabled=true",
             "model.hrda.detail_crop=[32,32]", "model.hrda.crop_divisible=16"]
# Each segmentor's own settings, and its context grid's input pixels a cell (alignment unit).
SEGMENTORS = {"mit": (["method.feature=decoder", "data.normalize=imagenet", "train.optimizer=adamw", "train.lr=6e-4",
                       "train.iters=3", *TINY_MIT], 8),
              "deeplabv2": (["data.normalize=imagenet", "train.iters=3", *TINY_DLV2], 16)}


def hrda_run_overrides(cache, segmentor: str = "mit") -> list[str]:
    """A tiny HRDA teacher run: 64x64 context crops (MiT needs 32 pixels a side at half
    resolution), 32x32 detail crops, of the synthetic pair at 64x128."""
    from conftest import TINY

    return TINY + [f"data.synthetic.cache_dir={cache}", "data.synthetic.height=64", "data.synthetic.width=128",
                   *SEGMENTORS[segmentor][0]]


MIT = ["model.backbone=mit_b0", "method.feature=decoder", "model.width=0.25", "model.decoder_dim=32",
       "model.proj_dim=16"]


def _records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (a, b))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _records_trust(run: Path, name: str = "log.jsonl") -> list[dict]:
    log = run / name
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def stopped_run(tmp_path, tiny_overrides):
    """A source-only run stopped at step 3 (checkpoints at 2 and 3: last.pt and last.prev.pt)."""
    import bida.engine.train as tr

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.iters=6"])
    assert tr.Trainer(cfg, run).fit(stop_after=3) is None
    return run


TINY_RUN = [
    "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.num_test=2", "data.synthetic.height=32",
    "data.synthetic.width=64", "data.crop=[32,64]", "model.width=0.125", "train.iters=4",
    "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=1", "train.quiet=true",
]


class _FullFile:
    """A real file object whose writes fail with ENOSPC once ``budget[0]`` bytes are written."""

    def __init__(self, fh, budget: list[int]):
        self._fh, self._budget = fh, budget

    def write(self, data):
        if len(data) > self._budget[0]:
            if self._budget[0]:
                self._fh.write(data[: self._budget[0]])  # the disk takes what fits
                self._fh.flush()
            self._budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget[0] -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


def fill_disk(monkeypatch, target, budget: int) -> None:
    """Files opened for writing whose path ``target(path)`` accepts share ``budget`` bytes."""
    real_open, left = builtins.open, [budget]

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax") and target(Path(file)):
            return _FullFile(fh, left)
        return fh

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def _one_line_trust(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


FOLDER_TINY = ["model.width=0.125", "data.crop=[16,32]", "train.iters=2", "train.checkpoint_every=1",
               "train.eval_every=100", "train.log_every=1", "train.quiet=true", "data.num_workers=0"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, list[str], str]:
    """A tiny source-only run on a folder pair with its own palette (trained once)."""
    root = tmp_path_factory.mktemp("folders")
    data = _folder_pair(root)
    run = root / "run"
    import io
    from contextlib import redirect_stdout

    err = io.StringIO()
    with redirect_stdout(err):
        assert main(["train", *data, *FOLDER_TINY, "--out", str(run)]) == 0
    return run, data, err.getvalue()


STEM = ("conv1.", "bn1.", "layer1.")


def _stems(state: dict) -> tuple[dict, dict]:
    """(source stem, target stem) of a model state dict, under the same keys."""
    source = {k: v for k, v in state.items() if k.startswith(STEM)}
    target = {k[len("target_stem."):]: v for k, v in state.items() if k.startswith("target_stem.")}
    return source, target


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


IGNORE = 255


def _features(seed=0, b=2, d=76, h=23, w=23, offset=30.0):
    g = torch.Generator().manual_seed(seed)
    # a large shared component, as the ASPP class scores have: what half precision loses
    return torch.randn(b, d, h, w, generator=g) + offset, torch.randint(0, 5, (b, h, w), generator=g)


class _Replay(torch.nn.Module):
    """A "network" that returns fixed outputs per domain, so that the test controls features."""

    def __init__(self, src: SegOutput, tgt: SegOutput):
        super().__init__()
        self.src, self.tgt = src, tgt
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, domain="source"):
        if x.shape[0] == 2 * self.src.logits.shape[0]:  # both domains in one call
            logits, features = torch.cat([self.src.logits, self.tgt.logits]), torch.cat([self.src.features, self.tgt.features])
        else:
            out = self.src if bool(x[0, 0, 0, 0] == 0) else self.tgt  # source images are zeros
            logits, features = out.logits, out.features
        return SegOutput(logits * self.weight, features * self.weight)


def _bida_batch(pad_feature: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    b, k, d, h, w = 2, 4, 16, 8, 8
    f_src = torch.randn(b, d, h, w, generator=g)
    y_src = torch.randint(0, k, (b, h * 8, w * 8), generator=g)
    f_tgt = torch.randn(b, d, h, w, generator=g)
    f_tgt[:, :, :, 6:] = pad_feature.view(1, d, 1, 1)  # the padded columns' features
    logits_tgt = torch.randn(b, k, h, w, generator=g)
    logits_tgt[:, :, :, 6:] = pad_feature[:k].view(1, k, 1, 1) * 5
    y_static = torch.randint(0, k, (b, h * 8, w * 8), generator=g)
    y_static[..., 24:] = 255
    valid = torch.ones(b, h * 8, w * 8, dtype=torch.bool)
    valid[..., 48:] = False  # crop padding: the last two feature columns
    src = SegOutput(torch.randn(b, k, h, w, generator=g), f_src)
    tgt = SegOutput(logits_tgt, f_tgt)
    batch_src = {"image": torch.zeros(b, 3, h * 8, w * 8), "label": y_src}
    batch_tgt = {"image": torch.ones(b, 3, h * 8, w * 8), "label": y_static, "valid": valid}
    return _Replay(src, tgt), batch_src, batch_tgt, k, d


def _holed_batch():
    model, bs, bt, k, d = _bida_batch(torch.zeros(16))
    g = torch.Generator().manual_seed(5)
    holes = torch.rand(bt["label"].shape, generator=g) < 0.1  # scattered holes inside labelled cells
    bt["label"] = torch.where(holes, torch.full_like(bt["label"], 255), bt["label"])
    return model, bs, bt, k


@torch.no_grad()
@torch.no_grad()
def naive_fused(model, x, run=None, os_=4):
    """HRDA's prediction of a whole input (sides multiples of 16, 32-pixel detail crops): the
    context at half resolution, the detail on 32-pixel windows at stride 16 (one forward
    each), averaged where they overlap, fused with the unmasked attention (paper eq. 5).
    ``run(image) -> (logits, attention logit)`` (default: MiT's decoder and attention on its
    encoder's levels); ``os_`` input pixels a cell."""
    base, (h, w) = model.base, x.shape[-2:]
    if run is None:
        def run(img):
            levels = base.backbone(img)
            return base.decode_head(levels)[0], model.scale_attention(levels)[0]
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    context, attention = run(small)
    attention = torch.sigmoid(attention)
    n = 32 // os_  # cells a window
    total = torch.zeros(x.shape[0], model.num_classes, h // os_, w // os_)
    count = torch.zeros(1, 1, h // os_, w // os_)
    for y in range(0, h - 16, 16):
        for c in range(0, w - 16, 16):
            total[..., y // os_:y // os_ + n, c // os_:c // os_ + n] += run(x[..., y:y + 32, c:c + 32])[0]
            count[..., y // os_:y // os_ + n, c // os_:c // os_ + n] += 1
    a_up = F.interpolate(attention, scale_factor=2, mode="bilinear", align_corners=False)
    low = F.interpolate((1 - attention) * context, scale_factor=2, mode="bilinear", align_corners=False)
    return a_up * (total / count) + low