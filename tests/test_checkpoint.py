"""bida.checkpoint: checksums, damaged and foreign checkpoints, the last good one."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from bida.checkpoint import load_checkpoint, save_checkpoint
from bida.config import load_config
from bida.errors import CheckpointError
from bida.models import DeepLabV2
from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import _one_line, _one_line_error, folder_args, folder_pair, run_cli, snapshot, stopped_run, train_args  # noqa: F401 (fixtures)


def test_checkpoint_of_other_class_count_or_architecture(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)  # 3 classes
    ckpt = tmp_path / "k19.pt"
    save_checkpoint({"model": DeepLabV2(19, "resnet18", width=0.125).state_dict()}, ckpt)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.init_checkpoint={ckpt}"]), capsys,
            "19 classes, the config has 3")
    ckpt50 = tmp_path / "r50.pt"
    save_checkpoint({"model": DeepLabV2(3, "resnet50", width=0.125).state_dict()}, ckpt50)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.init_checkpoint={ckpt50}"]), capsys,
            "architecture")


def test_truncated_checkpoint(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    ckpt = tmp_path / "cut.pt"
    save_checkpoint({"model": DeepLabV2(3, "resnet18", width=0.125).state_dict()}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.init_checkpoint={ckpt}"]), capsys, "cut.pt")


def test_pretrained_with_unexpected_keys(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    import torch

    state = DeepLabV2(3, "resnet18", width=0.125).state_dict()
    state["transformer.blocks.0.attn.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "odd.pth")
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.pretrained={tmp_path / 'odd.pth'}"]),
            capsys, "unexpected keys")


def test_disk_full_while_writing_checkpoint(tmp_path, capsys, monkeypatch):
    from bida.config import load_config
    from bida.engine.train import Trainer

    src, tgt = folder_pair(tmp_path)
    run = tmp_path / "run"
    cfg = load_config(None, folder_args(src, tgt) + ["train.iters=4", "train.checkpoint_every=1"])
    Trainer(cfg, run).fit(stop_after=1)  # a pre-empted run with a good checkpoint at step 1
    before = snapshot(tmp_path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import bida.checkpoint

    monkeypatch.setattr(bida.checkpoint.os, "fsync", full_disk)
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "No space left on device" in err and "last.pt" in err and "\n" not in err
    after = snapshot(tmp_path)
    # the checkpoint and config are untouched; no temporary file is left behind
    for key in ("run/checkpoints/last.pt", "run/config.yaml"):
        assert after[key] == before[key]
    assert not [k for k in after if ".tmp-" in k]


def test_a_directory_given_as_checkpoint_is_named_as_such(tmp_path, capsys, tiny_overrides):
    # before: "checkpoint DIR does not exist" for a directory that exists
    assert main(["train", "--out", str(tmp_path / "run"), *tiny_overrides, "method=bida",
                 f"model.init_checkpoint={tmp_path}"]) == 2
    assert "is a directory" in _one_line_error(capsys)


def _flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor payload of a torch.save zip."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_refused_everywhere_and_resume_falls_back(stopped_run, capsys, tiny_overrides,
                                                                          tmp_path):
    # before: resume loaded the damaged file and trained on, exit 0; evaluate/predict used it
    run = stopped_run
    last = run / "checkpoints" / "last.pt"
    _flip_tensor_bytes(last)
    with pytest.raises(CheckpointError, match="damaged: checksum mismatch"):
        load_checkpoint(last)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (64, 32)).save(image)
    for args in (["evaluate", "--checkpoint", str(last)],
                 ["predict", "--checkpoint", str(last), str(image), "--out", str(tmp_path / "pred")],
                 ["train", "--out", str(tmp_path / "adapt"), *tiny_overrides, "method=bida",
                  f"model.init_checkpoint={last}"]):
        assert main(args) == 2, args
        err = _one_line(capsys)
        assert str(last) in err and "damaged: checksum mismatch" in err, err
    damaged = last.read_bytes()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "damaged: checksum mismatch" in err and "resuming from the previous checkpoint" in err, err
    assert (run / "checkpoints" / "last.damaged.pt").read_bytes() == damaged  # kept, out of the way
    assert load_checkpoint(last)["step"] == 6


def test_the_last_good_checkpoint_is_never_a_damaged_one(stopped_run, tiny_overrides):
    # before: a TrainingDiverged message named a damaged last.pt "the last good checkpoint"
    from bida.engine.checkpointer import Checkpointer
    from bida.engine.distributed import DistContext
    from bida.engine.state import RunState

    _flip_tensor_bytes(stopped_run / "checkpoints" / "last.pt")
    # last_good reads only the files: the checkpointer of that directory, with nothing to save
    checkpointer = Checkpointer(stopped_run, None, None, RunState(), None, None, None, None, DistContext(), None,
                                None, print)
    assert checkpointer.last_good().endswith(f"{stopped_run / 'checkpoints' / 'last.prev.pt'} (step 2)")


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "old.pt")  # an older bida file, or public weights
    assert torch.equal(load_checkpoint(tmp_path / "old.pt")["model"]["w"], torch.ones(2))
