"""The benchmarks' shared helpers: where their result files go and how the kept-run arguments are checked."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import kept_runs  # noqa: E402  (benchmarks/kept_runs.py)
from model_speed import cpu_model, slug, write_result  # noqa: E402  (benchmarks/model_speed.py)


def test_write_result_keeps_a_dot_in_the_stem(tmp_path):
    """Two settings' results ("c0.6", "c0.7") go to two pairs of files, not both to "c0.json"."""
    for setting in ("0.6", "0.7"):
        write_result(tmp_path / "runs" / f"novel-c{setting}-amd", {"setting": setting}, f"# {setting}\n")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "novel-c0.6-amd.json", "novel-c0.6-amd.md", "novel-c0.7-amd.json", "novel-c0.7-amd.md"]
    assert json.loads((tmp_path / "runs" / "novel-c0.6-amd.json").read_text()) == {"setting": "0.6"}
    assert (tmp_path / "runs" / "novel-c0.7-amd.md").read_text() == "# 0.7\n"


def cpuinfo(name: str, flags: str, processors: int = 2) -> str:
    block = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\nmodel name\t: {name}\nflags\t\t: {flags}\n\n"
    return "".join(block.format(n) for n in range(processors))


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse2 avx avx2 fma avx512f avx512bw", "AMD EPYC (AVX-512)"),
    ("fpu sse2 avx avx2 fma", "AMD EPYC (AVX2)"),
    ("fpu sse2", "AMD EPYC"),
])
def test_the_machine_is_its_name_and_widest_vector_extension(flags, expected):
    assert cpu_model(cpuinfo("AMD EPYC", flags)) == expected


def test_hosts_of_one_name_and_other_vector_extensions_write_other_result_files():
    """Two hosts that both report "AMD EPYC" trained the paper configuration in 1,576 s and 800 s a run, to
    test CIDEr 0.579 and 0.831: a result file must say which kind of host made it."""
    assert slug(cpu_model(cpuinfo("AMD EPYC", "avx2 avx512f"))) == "amd-epyc-avx-512"
    assert slug(cpu_model(cpuinfo("AMD EPYC", "avx2"))) == "amd-epyc-avx2"


def parse(argv: list[str], monkeypatch) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench")
    kept_runs.add_arguments(parser, "which images")
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    return kept_runs.parse_arguments(parser)


def test_split_val_needs_kept_runs(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse(["--split", "val"], monkeypatch)
    assert "--split val needs --rescore" in capsys.readouterr().err
    args = parse(["--split", "val", "--rescore", "runs"], monkeypatch)
    assert (args.split, args.rescore) == ("val", Path("runs"))


def test_a_report_records_a_rescore_only(monkeypatch):
    assert kept_runs.report_entry(parse(["--keep", "runs"], monkeypatch)) == {}
    assert kept_runs.report_entry(parse(["--rescore", "runs", "--split", "val"], monkeypatch)) == {
        "rescored": "runs", "split": "val"}


def test_a_held_out_category_is_all_of_the_test_split_and_none_of_training():
    """Leave-category-out: every image of the held-out category is tested (its train and val rows too, none
    was seen) and none is trained on or stored; the other categories keep train and val, not test."""
    import pandas as pd
    from novel import held_out_manifest  # benchmarks/novel.py

    manifest = pd.DataFrame({"image_id": [f"i{n}" for n in range(9)],
                             "category": ["food"] * 3 + ["animals"] * 3 + ["toys"] * 3,
                             "split": ["train", "val", "test"] * 3})
    out = held_out_manifest(manifest, "food")
    assert sorted(out[out["split"] == "test"]["image_id"]) == ["i0", "i1", "i2"]
    assert set(out[out["split"] != "test"]["category"]) == {"animals", "toys"}
    assert sorted(out["image_id"]) == ["i0", "i1", "i2", "i3", "i4", "i6", "i7"]    # the others' test rows left out
    assert out.set_index("image_id").loc[["i3", "i4", "i6", "i7"], "split"].tolist() == ["train", "val"] * 2
    with pytest.raises(SystemExit, match="no category 'fruit'.*'animals', 'food', 'toys'"):
        held_out_manifest(manifest, "fruit")


def test_a_benchmark_without_a_datasets_embeddings_says_which_stage_makes_them(tmp_path):
    """Before any run starts: the folder, what it lacks and the command that makes it, not a worker's
    traceback about a parquet file."""
    from quality import embedded  # benchmarks/quality.py

    with pytest.raises(SystemExit, match=r"has no manifest.parquet or embeddings.*`dvc repro embed@openclipart`"):
        embedded(tmp_path, "openclipart")
    (tmp_path / "manifest.parquet").touch()
    with pytest.raises(SystemExit, match=r"has no embeddings: "):
        embedded(tmp_path, "openclipart")
    (tmp_path / "embeddings").mkdir()
    assert embedded(tmp_path, "openclipart") == tmp_path
