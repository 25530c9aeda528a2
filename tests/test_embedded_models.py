"""The embedded models are listed once (data.model_zoo.EMBEDDED): the UI offers them, the config
check names them, and what is stated about them before they are built matches the real model."""
from __future__ import annotations

import json

import pytest

from data.model_zoo import EMBEDDED, EMBEDDED_SPECS, embedded_model


def test_the_ui_and_the_config_check_offer_the_one_list() -> None:
    from app.common import model_choices
    from training.checks import check_config
    from training.config import RunConfig

    assert model_choices()[: len(EMBEDDED_SPECS)] == EMBEDDED_SPECS
    problems = check_config(RunConfig(model="embedded:nope", datasets=["db:x"]))
    (unknown,) = [p for p in problems if "unknown embedded model" in p]
    assert all(spec in unknown for spec in EMBEDDED_SPECS)


def test_specs_resolve_to_their_model() -> None:
    for spec in EMBEDDED_SPECS:
        assert embedded_model(spec).spec == spec
    assert embedded_model("embedded:nope") is None and embedded_model("some/folder") is None


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_what_is_known_before_building_matches_the_model(name: str) -> None:
    model = EMBEDDED[name]
    assert set(model.shape) == {"n_params", "n_layers", "hidden", "heads", "vocab"}
    configs = []
    if model.config is not None:
        configs.append(model.config())
    if model.built_folder() is not None:  # built on this machine (the tests cache): read it, never build
        configs.append(json.loads((model.built_folder() / "config.json").read_text()))
    for config in configs:
        text = config.get("text_config", config)
        assert config["model_type"] == model.model_type or text.get("model_type") == model.model_type
        assert text["num_hidden_layers"] == model.shape["n_layers"] and text["hidden_size"] == model.shape["hidden"]
        assert text["vocab_size"] == model.shape["vocab"] and text["num_attention_heads"] == model.shape["heads"]
