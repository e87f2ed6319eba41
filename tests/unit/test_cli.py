import json
import re

import pytest
import torch

from clipcap.cli import main


def test_bad_params_exit_with_a_message_naming_the_key(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: ten\n")
    assert main(["--params", str(params), "fetch"]) == 1
    err = capsys.readouterr().err
    assert "train.epochs: expected an integer, got 'ten'" in err
    assert "Traceback" not in err


def test_datasets_lists_params_datasets_and_an_unknown_one_is_refused(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("datasets:\n  stamps: {}\n  mine:\n    dataset: {source: folder, root: photos}\n")
    assert main(["--params", str(params), "datasets"]) == 0
    assert capsys.readouterr().out.split() == ["stamps", "mine"]
    assert main(["--params", str(params), "--dataset", "theirs", "fetch"]) == 1
    assert "dataset 'theirs': not defined in params.yaml (datasets: stamps, mine)" in capsys.readouterr().err


def test_a_stage_writes_its_datasets_artifacts_folder(tmp_path, capsys, monkeypatch):
    """`clipcap --dataset mine fetch` reads mine's overrides and writes artifacts/mine/."""
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(photos / "red.png")
    (photos / "captions.jsonl").write_text('{"image": "red.png", "caption": "A red square."}\n')
    (tmp_path / "params.yaml").write_text("datasets:\n  stamps: {}\n  mine:\n    dataset: {source: folder, root: photos}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", "mine", "fetch"]) == 0, capsys.readouterr().err
    assert (tmp_path / "artifacts" / "mine" / "raw_manifest.parquet").exists()
    assert not (tmp_path / "artifacts" / "raw_manifest.parquet").exists()


def test_caption_of_a_missing_image_names_it(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nope.png"), "--model", str(tmp_path)]) == 1
    assert "nope.png" in capsys.readouterr().err


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    from clipcap.modeling.captioner import save_captioner
    from clipcap.config import MapperConfig
    from clipcap.modeling.lms import load_lm
    from clipcap.modeling.model import ClipCap

    lm = load_lm("tiny-gpt2:n_layer=1,n_embd=32", "smollm2-135m", seed=1)
    torch.manual_seed(0)  # the same mapper whatever ran before
    model = ClipCap(MapperConfig(prefix_length=3, clip_length=2, num_layers=1, num_heads=2), 1280, lm.model)
    return save_captioner(tmp_path_factory.mktemp("captioner") / "m", model, encoder="efficientnet-lite0:random",
                          lm_name="tiny-gpt2:n_layer=1,n_embd=32", tokenizer_name="smollm2-135m", lm_pretrained=False)


@pytest.fixture
def image_folder(make_image):
    for name, color in [("b.png", (200, 0, 0)), ("a.jpg", (0, 200, 0)), ("nested/c.png", (0, 0, 200))]:
        make_image(f"photos/{name}", color=color)
    (make_image("photos/a.jpg").parent / "notes.txt").write_text("not an image")
    return make_image("photos/a.jpg").parent


def test_caption_a_folder_with_several_captions_each(captioner_dir, image_folder, capsys):
    args = ["caption", str(image_folder), "--model", str(captioner_dir), "--num-beams", "3", "--num-captions", "2",
            "--max-new-tokens", "4", "--workers", "0"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    paths = [line.split("\t")[0] for line in lines]
    expected = [str(image_folder / n) for n in ("a.jpg", "b.png", "nested/c.png")]
    assert paths == [p for p in expected for _ in range(2)]  # sorted, recursive, images only, 2 each

    assert main([*args, "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == expected
    assert all(len(r["captions"]) == 2 for r in records)


def test_caption_refuses_impossible_options_by_name(captioner_dir, image_folder, capsys):
    args = ["caption", str(image_folder), "--model", str(captioner_dir), "--num-beams", "2", "--num-captions", "3"]
    assert main(args) == 1
    assert "num_captions=3 exceeds num_beams=2" in capsys.readouterr().err


def test_interpret_prints_each_prefix_vector_as_tokens(captioner_dir, image_folder, capsys):
    assert main(["interpret", str(image_folder / "b.png"), "--model", str(captioner_dir), "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    prefix_lines = [line for line in lines if line.startswith("prefix")]
    assert len(prefix_lines) == 3  # K = 3
    # four tokens each, every one followed by its cosine (a token may itself hold quotes or spaces)
    assert all(len(re.findall(r" -?\d\.\d\d(?=  |$)", line)) == 4 for line in prefix_lines), prefix_lines


def test_nearest_tokens_finds_the_token_a_prefix_vector_equals():
    from clipcap.modeling.interpret import nearest_tokens
    from helpers import tiny_clipcap

    model = tiny_clipcap()
    vocabulary = model.lm.get_input_embeddings().weight.detach()
    model.prefix = lambda embedding: vocabulary[[7, 3, 11, 5]].unsqueeze(0) * 2.5  # cosine ignores the scale

    class Tokens:
        def convert_ids_to_tokens(self, token_id):
            return f"t{token_id}"

    found = nearest_tokens(model, Tokens(), torch.zeros(16), top_k=2)
    assert [row[0].token_id for row in found] == [7, 3, 11, 5]
    assert all(row[0].token == f"t{row[0].token_id}" and row[0].cosine == pytest.approx(1.0) for row in found)
    assert all(row[1].cosine < row[0].cosine for row in found)


def test_tsv_output_survives_tabs_and_newlines_in_file_names(captioner_dir, make_image, capsys):
    import csv
    import io

    odd = make_image("odd/tab\there\nnewline.png", color=(10, 200, 10))
    assert main(["caption", str(odd), "--model", str(captioner_dir), "--max-new-tokens", "3", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.reader(io.StringIO(out), delimiter="\t"))
    assert len(rows) == 1 and rows[0][0] == str(odd) and len(rows[0]) == 2


def test_models_lists_promotes_and_rolls_back_by_hand(tmp_path, capsys, monkeypatch):
    from clipcap.config import RegisterConfig
    from clipcap.pipeline.registry import log_and_register

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(f"register: {{tracking_uri: '{store}'}}\ndatasets: {{toy: {{}}}}\n")
    captioner = tmp_path / "captioner"
    captioner.mkdir()
    (captioner / "config.json").write_text("{}")
    for cider in (0.3, 0.2):  # version 1 champion, version 2 not
        log_and_register(RegisterConfig(tracking_uri=store), "toy", captioner, {}, {"model_CIDEr": cider}, {}, [],
                         example_image="x.png", test_set="t")
    assert main(["models", "promote", "toy", "2", "--reason", "a person checked it"]) == 0
    assert "clipcap-toy version 2 is the champion: promoted by hand (champion before: 1): a person checked it" in (
        capsys.readouterr().out)
    assert main(["models", "rollback", "toy"]) == 0
    assert "clipcap-toy version 1 is the champion: rolled back from version 2" in capsys.readouterr().out
    assert main(["models", "list", "toy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["2", "1"] and "champion" in lines[1] and "CIDEr   0.3000" in lines[1]
    assert main(["models", "promote", "toy"]) == 1
    assert "name the version" in capsys.readouterr().err
