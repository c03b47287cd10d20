"""The plug-in registry: names, errors, and third-party entry points."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lattn_app.attention import create_attention
from lattn_app.registry import ATTENTIONS, Registry, UnknownNameError

PLUGIN_MODULE = '''
"""A third-party attention mechanism, shipped outside lattn."""
from lattn_app.attention.base import TokenMixer


class MeanMixer(TokenMixer):
    """Replaces every token by the mean token (a plug-in for the tests)."""

    def __init__(self, dim, num_heads=1, scale=1.0):
        super().__init__(dim)
        self.scale = scale

    def mix(self, x, hw, context, context_hw):
        return x.mean(dim=1, keepdim=True).expand_as(x) * self.scale
'''


def install_plugin(site: Path, distribution: str, entry_points: str, module: str | None = None) -> None:
    """Write an installed distribution (dist-info with entry_points.txt) into the directory `site`."""
    info = site / f"{distribution}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module is not None:
        (site / f"{distribution}.py").write_text(module)


def test_unknown_name_lists_the_available_names_and_the_closest_match():
    with pytest.raises(UnknownNameError) as error:
        create_attention("efficent", dim=64, num_heads=4)
    message = str(error.value)
    assert "Unknown attention mechanism 'efficent'. Did you mean 'efficient'?" in message
    for name in ("softmax", "performer", "linformer", "nystrom", "fnet", "mixer", "coupling", "care"):
        assert name in message


def test_unknown_option_names_the_closest_accepted_option():
    with pytest.raises(TypeError, match="attention mechanism 'efficient' has no option 'normalisation'. "
                       "Did you mean 'normalization'?"):
        create_attention("efficient", dim=64, num_heads=4, normalisation="scaling")


def test_bad_option_values_are_named():
    with pytest.raises(ValueError, match="normalization must be one of .*got 'l2'"):
        create_attention("efficient", dim=64, num_heads=4, normalization="l2")
    with pytest.raises(ValueError, match="variant must be one of .*got 'sum'"):
        create_attention("coupling", dim=64, num_heads=4, variant="sum")


def test_registering_a_name_twice_is_an_error():
    registry = Registry("widget", "lattn.tests.none")
    registry.register("a")(dict)
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        registry.register("a")(list)


def test_entry_point_plugins_are_found_on_first_use(tmp_path, monkeypatch):
    install_plugin(tmp_path, "lattn_test_plugin", """
        [lattn.attention]
        mean = lattn_test_plugin:MeanMixer
    """, PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("attention mechanism", "lattn.attention")  # a fresh registry: nothing loaded yet
    assert registry.names() == ["mean"]
    entry = registry.get("mean")
    assert entry.source == "lattn_test_plugin"
    assert entry.description == "Replaces every token by the mean token (a plug-in for the tests)."
    import torch

    mixer = registry.create("mean", dim=8, num_heads=1, scale=2.0)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(mixer(x, hw=(1, 5)), 2 * x.mean(1, keepdim=True).expand_as(x))


def test_broken_plugins_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    install_plugin(tmp_path, "lattn_broken_plugin", """
        [lattn.backbones]
        broken = lattn_no_such_module:Thing
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("backbone", "lattn.backbones")
    with caplog.at_level(logging.WARNING):
        assert "broken" not in registry.names()
    assert "Skipping backbone plug-in 'broken'" in caplog.text


def test_installed_plugins_reach_the_lattn_command_and_create_attention(tmp_path):
    install_plugin(tmp_path, "lattn_test_plugin", """
        [lattn.attention]
        mean = lattn_test_plugin:MeanMixer
    """, PLUGIN_MODULE)
    env_path = str(tmp_path)
    listing = subprocess.run(
        [sys.executable, "-m", "lattn_app", "list", "attention"],
        capture_output=True, text=True, check=True, env={"PYTHONPATH": env_path, "PATH": ""},
    ).stdout
    assert "mean" in listing and "[lattn_test_plugin]" in listing
    script = "from lattn_app.attention import create_attention; print(type(create_attention('mean', 8)).__name__)"
    built = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env={"PYTHONPATH": env_path}
    ).stdout
    assert built.strip() == "MeanMixer"


def test_global_registry_describes_each_mechanism():
    for entry in ATTENTIONS.entries():
        if entry.source == "lattn":
            assert entry.description and entry.time.startswith("O(") and entry.memory.startswith("O(")
