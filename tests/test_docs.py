import importlib.util

from tests.helpers import ROOT


def test_configuration_doc_matches_schema():
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "scripts" / "gen_config_doc.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "configuration.md").read_text() == gen.render(), "run: python scripts/gen_config_doc.py"


def test_every_trainer_key_is_documented():
    from cifar10ds.config import TrainerConfig

    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name in TrainerConfig.model_fields:
        assert f"`trainer.{name}`" in doc
