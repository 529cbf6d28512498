import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from comcat.compression.convert import compress
from comcat.compression.format import load_compressed, save_compressed
from comcat.compression.load import load_model
from comcat.compression.models import Loaded
from comcat.compression.rank_rules import energy_ranks, uniform_ranks
from comcat.compression.ranks import RankConfig
from comcat.core.errors import ComcatError
from conftest import IMAGENET, VIT_TINY


def test_format_2_folders_still_load(embedded, tmp_path):
    """Format /3 renamed the rank file's classifier key ("head" -> "classifier"); /2 folders load."""
    from dataclasses import replace

    cfg = replace(uniform_ranks(embedded.model, "head", 0.5), classifier=4)
    small = compress(embedded.model, cfg).eval()
    out = save_compressed(replace(embedded, model=small), tmp_path / "m")
    meta = json.loads((out / "comcat.json").read_text())
    assert meta["format"] == "comcat-compressed/3" and meta["ranks"]["classifier"] == 4
    ranks = {k: v for k, v in meta["ranks"].items() if k != "classifier"} | {"head": 4}
    (out / "comcat.json").write_text(json.dumps({**meta, "format": "comcat-compressed/2", "ranks": ranks}))
    back = load_compressed(out)
    assert back.model.comcat_ranks.classifier == 4 and back.model.head.rank == 4
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back.model(x), small(x))
    (out / "comcat.json").write_text(json.dumps({**meta, "format": "comcat-compressed/1"}))
    with pytest.raises(ComcatError, match="has format 'comcat-compressed/1'"):
        load_compressed(out)


def test_save_reload_round_trip(embedded, tmp_path):
    cfg = energy_ranks(embedded.model, "head", 0.9, mlp=True)
    small = compress(embedded.model, cfg)
    out = save_compressed(
        Loaded(small, embedded.arch, embedded.arch_kwargs, "embedded"), tmp_path / "m", {"metrics": {"top1": 1.0}}
    )
    assert sorted(p.name for p in out.iterdir()) == ["comcat.json", "model.safetensors"]
    meta = json.loads((out / "comcat.json").read_text())
    assert meta["method"] == "head" and meta["ranks"]["blocks"] == cfg.blocks and meta["metrics"]["top1"] == 1.0
    back = load_model(str(out))
    assert back.compressed and back.meta["params"] == sum(p.numel() for p in small.parameters())
    from comcat.compression.cost import model_flops

    assert back.meta["flops"] == model_flops(embedded.model, cfg)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.model(x), small(x))
    # saving again over the same directory replaces it atomically and leaves no temp folders
    save_compressed(back, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_saved_model_is_one_unit_with_the_usual_file_modes(embedded, tmp_path):
    """A new folder appears whole (written beside it, then renamed); in a run's folder the two files
    carry one pair id, so a comcat.json from another save than the weights is refused."""
    small = compress(embedded.model, uniform_ranks(embedded.model, "head", 0.5))
    out = save_compressed(Loaded(small, embedded.arch), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == ["comcat.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    first = (out / "comcat.json").read_text()
    save_compressed(Loaded(small, embedded.arch), out)  # a second save into the same folder
    assert json.loads(first)["pair"] != json.loads((out / "comcat.json").read_text())["pair"]
    (out / "comcat.json").write_text(first)  # as if killed between the two renames
    with pytest.raises(ComcatError, match="come from different saves"):
        load_compressed(out)


def test_save_refuses_dense_model_and_foreign_dir(embedded, tmp_path):
    with pytest.raises(ComcatError, match="only compressed"):
        save_compressed(embedded, tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    small = compress(embedded.model, uniform_ranks(embedded.model, "matrix", 0.5))
    with pytest.raises(ComcatError, match="not a comcat model directory"):
        save_compressed(Loaded(small, embedded.arch), tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 2000}, "depth / width"),
        ({"embed_dim": 200000}, "depth / width"),
        ({"mlp_ratio": 1000.0}, "describes a model of"),
        ({"num_heads": 7}, "no buildable model"),
        ({"evil": 1}, "invalid arch"),
        ({"depth": "6"}, "depth / width"),
    ],
)
def test_metadata_is_checked_against_the_stored_shapes_before_allocating(embedded, tmp_path, kwargs, message):
    import json
    import resource

    small = compress(embedded.model, uniform_ranks(embedded.model, "head", 0.5, mlp=True))
    out = save_compressed(Loaded(small, embedded.arch), tmp_path / "m")
    meta = json.loads((out / "comcat.json").read_text())
    (out / "comcat.json").write_text(json.dumps({**meta, "arch_kwargs": kwargs}))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ComcatError, match=message):
        load_compressed(out)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # kB: nothing big allocated


def test_local_checkpoint_formats(embedded, tmp_path):
    sd = embedded.model.state_dict()
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save({"model": sd}, tmp_path / "m.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "m.bin")
    x = torch.randn(2, 3, 32, 32)
    ref = embedded.model(x)
    for name in ("m.safetensors", "m.pth", "m.bin"):
        loaded = load_model(str(tmp_path / name), arch="comcat_shapes_vit")
        assert torch.equal(loaded.model(x), ref), name


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize(
    "spec, arch, message",
    [
        ("resnet18", None, "not a model family comcat supports"),
        ("no_such_model_xyz", None, "not 'embedded', a file"),
        ("missing.safetensors", "vit_tiny_patch16_224", "does not exist"),
        ("EMBEDDED_AS_FILE", None, "also pass its architecture"),
        ("EMBEDDED_AS_FILE", "vit_tiny_patch16_224", "does not match"),
        ("EMBEDDED_AS_FILE", "not_an_arch", "unknown architecture"),
        ("CORRUPT.safetensors", "vit_tiny_patch16_224", "could not read checkpoint"),
        ("CORRUPT.pth", "vit_tiny_patch16_224", "could not read checkpoint"),
        ("EVIL.pth", "vit_tiny_patch16_224", "could not read checkpoint"),
        ("NOTWEIGHTS.pth", "vit_tiny_patch16_224", "state dict of tensors"),
        ("NAN.safetensors", "comcat_shapes_vit", "NAN.safetensors: blocks.0.attn.qkv.weight holds NaN or inf values"),
        ("EMPTYDIR", None, "has neither comcat.json nor config.json"),
        ("vit_tiny_patch16_224", None, "cannot be downloaded"),
        ("deit_small_patch16_224", None, "cannot be downloaded"),
        ("timm:not_a_model", None, "is not a timm model name"),
    ],
)
def test_bad_models_give_one_line_errors(tmp_path, monkeypatch, spec, arch, message, capsys):
    from comcat.core.embedded import EMBEDDED_WEIGHTS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: offline and nothing cached
    (tmp_path / "CORRUPT.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (tmp_path / "CORRUPT.pth").write_bytes(b"PK\x03\x04garbage")
    (tmp_path / "EVIL.pth").write_bytes(pickle.dumps({"x": Evil()}))
    torch.save({"lr": 0.1, "epoch": 3}, tmp_path / "NOTWEIGHTS.pth")
    (tmp_path / "EMPTYDIR").mkdir()
    from safetensors.torch import load_file

    weights = load_file(str(EMBEDDED_WEIGHTS))
    weights["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(weights, str(tmp_path / "NAN.safetensors"))
    spec = {"EMBEDDED_AS_FILE": str(EMBEDDED_WEIGHTS)}.get(spec, spec)
    if "." in spec or spec.isupper():
        spec = spec if spec.startswith("/") else str(tmp_path / spec)
    with pytest.raises(ComcatError, match=message) as err:
        load_model(spec, arch)
    assert "\n" not in str(err.value)
    assert "code ran" not in capsys.readouterr().out


def test_corrupt_compressed_dir(embedded, tmp_path):
    small = compress(embedded.model, uniform_ranks(embedded.model, "head", 0.5))
    out = save_compressed(Loaded(small, embedded.arch), tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ComcatError, match="could not read"):
        load_compressed(out)
    (out / "comcat.json").write_text("{not json")
    with pytest.raises(ComcatError, match="corrupt"):
        load_compressed(out)


def test_bad_rank_configs(embedded, tmp_path):
    m = embedded.model
    with pytest.raises(ComcatError, match="has 2 blocks but the model has 6"):
        RankConfig("head", [{"qk": 4, "vo": 4}] * 2).validate(m)
    with pytest.raises(ComcatError, match="out of range"):
        RankConfig("head", [{"qk": 33, "vo": 4}] * 6).validate(m)
    with pytest.raises(ComcatError, match="out of range"):
        RankConfig("head", [{"qk": 0, "vo": 4}] * 6).validate(m)
    with pytest.raises(ComcatError, match="unknown rank keys"):
        RankConfig("head", [{"qk": 4, "vo": 4, "q": 3}] * 6).validate(m)
    with pytest.raises(ComcatError, match="needs a rank"):
        RankConfig("head", [{"qk": 4}] * 6).validate(m)
    bad = tmp_path / "r.json"
    bad.write_text("[1, 2")
    with pytest.raises(ComcatError, match="not valid JSON"):
        RankConfig.load(bad)
    with pytest.raises(ComcatError, match="does not exist"):
        RankConfig.load(tmp_path / "nope.json")
    with pytest.raises(ComcatError, match="ratio must be in"):
        uniform_ranks(m, "head", 1.5)


@pytest.mark.skipif(not VIT_TINY.is_file() or not IMAGENET.is_dir(), reason="../shared/data not present")
def test_real_vit_tiny_full_rank_keeps_predictions():
    from comcat.compression.evaluate import image_folder
    from comcat.compression.ranks import site_limits

    loaded = load_model(str(VIT_TINY), arch="vit_tiny_patch16_224")
    ds = image_folder(IMAGENET, loaded.model, limit=24)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        ref = loaded.model(x)
        for method in ("head", "matrix"):
            cfg = RankConfig(
                method,
                [
                    {k: v for k, v in site_limits(b, method).items() if k not in ("fc1", "fc2")}
                    for b in loaded.model.blocks
                ],
            )
            out = compress(loaded.model, cfg)(x)
            assert torch.equal(out.argmax(1), ref.argmax(1))
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


def _timm_export(folder, **args):
    """A tiny timm ViT saved as timm exports to the hub: config.json (architecture + model args) and
    model.safetensors."""
    import timm
    from timm.models._hub import save_for_hf

    args = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10, **args}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return model


def test_a_timm_export_folder_loads_and_its_compressed_copy_reloads_without_it(tmp_path):
    import shutil
    from dataclasses import replace

    dense = _timm_export(tmp_path / "export")
    loaded = load_model(str(tmp_path / "export"))
    x = torch.randn(2, 3, 32, 32)
    assert loaded.arch == "vit_tiny_patch16_224" and loaded.arch_kwargs["depth"] == 2
    assert torch.equal(loaded.model(x), dense(x)) and loaded.source == str(tmp_path / "export")
    small = compress(loaded.model, uniform_ranks(loaded.model, "head", 0.5)).eval()
    out = save_compressed(replace(loaded, model=small), tmp_path / "small")
    shutil.rmtree(tmp_path / "export")  # the compressed model needs neither the folder nor the hub
    assert torch.equal(load_model(str(out)).model(x), small(x))


def test_hub_specs_load_from_the_hub_cache_offline_and_fail_in_one_line(tmp_path, monkeypatch):
    """hf-hub:org/name from the local hub cache with the network off (a subprocess, so that the
    cache folder is the one huggingface_hub reads at import); missing ids, org/name ids that are not
    cached and transformers folders without weights each get one line."""
    from conftest import run_cli

    snapshot = tmp_path / "hub" / "models--comcat-test--tiny-vit" / "snapshots" / "0123abcd"
    _timm_export(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = run_cli("-m", "comcat", "analyze", "--model", "hf-hub:comcat-test/tiny-vit", env=env)
    assert r.returncode == 0 and "hf-hub:comcat-test/tiny-vit: 2 blocks, 3 heads" in r.stdout, r.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ComcatError, match=r"hf-hub:comcat-test/missing are not on this machine .*\(offline mode"):
        load_model("hf-hub:comcat-test/missing")
    with pytest.raises(ComcatError, match=r"someone/some-vit are not on this machine .*\(offline mode"):
        load_model("someone/some-vit")  # a transformers (or timm) model on the hub, not cached
    with pytest.raises(ComcatError, match="is not a hub id"):
        load_model("hf-hub:not a hub id")
    hf = tmp_path / "hf-vit"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 192}))
    with pytest.raises(ComcatError, match=r"could not load hf-vit as ViTModel \(.*\): its weights .* or are missing"):
        load_model(str(hf))  # a transformers folder without weights


def test_a_checkpoint_without_a_classifier_loads_as_a_backbone(tmp_path):
    import timm
    from safetensors.torch import save_file

    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    save_file(backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    loaded = load_model(str(tmp_path / "backbone.safetensors"), "vit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    assert loaded.arch_kwargs == {"num_classes": 0} and torch.equal(loaded.model(x), backbone(x))
