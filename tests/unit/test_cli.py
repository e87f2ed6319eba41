from clipcap.cli import main


def test_bad_params_exit_with_a_message_naming_the_key(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: ten\n")
    assert main(["--params", str(params), "fetch"]) == 1
    err = capsys.readouterr().err
    assert "train.epochs: expected an integer, got 'ten'" in err
    assert "Traceback" not in err


def test_caption_of_a_missing_image_names_it(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nope.png"), "--model", str(tmp_path)]) == 1
    assert "nope.png" in capsys.readouterr().err
