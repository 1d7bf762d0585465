"""`kdray teachers import`: classifiers trained elsewhere (torchvision or kdray key layout, plain or
wrapped state dicts, torchvision weights) become a verified teacher set that `kdray train` uses;
a file that does not fit its architecture is one line and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision.models as tvm
from conftest import error_line, run_cli

from kdray.core.io import sha256_file
from kdray.models import build_model
from kdray.models.tv import from_torchvision_state
from kdray.teachers.ensemble import load_teachers
from kdray.teachers.manifest import read_manifest

DATA = ["--dataset", "fake", "--image-size", "16", "--device", "cpu"]


def nothing_written(tmp_path, out) -> bool:
    """Neither ``out`` nor a half-written staging folder next to it."""
    return not out.exists() and not list(tmp_path.glob(f".{out.name}.importing-*"))


@pytest.fixture(scope="module")
def tv_resnet18(tmp_path_factory):
    """A torchvision resnet18 for 10 classes with random weights, its state dict saved as users do."""
    torch.manual_seed(0)
    model = tvm.resnet18(num_classes=10).eval()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_torchvision_resnet18_imports_and_teaches(tmp_path, capsys, tv_resnet18):
    model, path = tv_resnet18
    out = tmp_path / "imported"
    code, stdout, err = run_cli(capsys, "teachers", "import", path, "--arch", "resnet18", "--out", out, *DATA, "--json")
    assert code == 0, err
    printed = json.loads(stdout)
    manifest = read_manifest(out)
    assert printed == {"out": str(out), **manifest}
    assert manifest["format"] == "kdray-teachers/1" and manifest["dataset"] == "fake"
    assert manifest["image_size"] == 16 and manifest["train_fraction"] == 1.0 and len(manifest["classes"]) == 10
    (entry,) = manifest["teachers"]
    assert entry["file"] == "teacher_0.pt" and entry["arch"] == "resnet18" and entry["imported"] is True
    assert entry["source"] == str(path.resolve()) and entry["layout"] == "torchvision"
    assert entry["params"] == sum(p.numel() for p in model.parameters())
    assert 0 <= entry["val_acc"] <= 1 and 0 <= entry["test_acc"] <= 1
    assert entry["sha256"] == sha256_file(out / "teacher_0.pt")
    assert "teacher 1/1: resnet18 from" in err and "(torchvision layout)" in err

    # the imported teacher computes what the original torchvision model computes
    teacher = load_teachers(out, manifest["classes"]).members[0]  # verifies the sha256 and the weights
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(x), atol=1e-5, rtol=1e-5)

    code, stdout, err = run_cli(capsys, "teachers", "show", out)
    assert code == 0 and "all verified" in stdout, err
    assert f"teacher_0.pt: resnet18 imported from {path.resolve()} test acc" in stdout and "seed" not in stdout

    code, stdout, err = run_cli(capsys, "--workdir", tmp_path, "train", "--method", "kd", "--teachers", out,
                                "--student", "resnet8", "--epochs", "1", "--no-track", "--json", *DATA)
    assert code == 0, err[-2000:]
    assert json.loads(stdout)["method"] == "kd" and "kd=" in err  # distilled from the imported teacher


def test_a_state_dict_of_another_arch_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "resnet34.pt"
    torch.save(tvm.resnet34(num_classes=10).state_dict(), path)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "teachers", "import", path, "--arch", "resnet18", "--out", out, *DATA)
    assert code == 2
    line = error_line(err)
    assert str(path) in line and "'resnet18'" in line and "unexpected keys (layer1.2.conv1.weight" in line
    assert nothing_written(tmp_path, out)


@pytest.mark.parametrize("argv, needle", [
    (["--arch", "resnet18", "--layout", "kdray"], "missing keys (stem.0.weight"),  # forced wrong layout
    (["--arch", "resnet8"], "'resnet8' is not a torchvision model"),  # torchvision keys, CIFAR arch
    (["--arch", "resnet18", "--arch", "resnet18"], "2 --arch given for 1 teacher source(s)"),
    (["--arch", "resnet9000"], "unknown model 'resnet9000'"),
])
def test_bad_imports_are_one_line_and_write_nothing(tmp_path, capsys, tv_resnet18, argv, needle):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "teachers", "import", tv_resnet18[1], *argv, "--out", out, *DATA)
    assert code == 2 and needle in error_line(err)
    assert nothing_written(tmp_path, out)


def test_an_out_folder_with_anything_in_it_is_never_overwritten(tmp_path, capsys, tv_resnet18):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "teachers", "import", tv_resnet18[1], "--arch", "resnet18", "--out", out, *DATA)
    assert code == 2 and "is not an empty folder; kdray never overwrites it" in error_line(err)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_kdray_teacher_file_imports_as_is(tmp_path, capsys, fake_teachers):
    original = read_manifest(fake_teachers)["teachers"][0]  # resnet8, trained by kdray
    out = tmp_path / "again"
    code, stdout, err = run_cli(capsys, "teachers", "import", fake_teachers / "teacher_0.pt", "--arch",
                                original["arch"], "--out", out, *DATA, "--json")
    assert code == 0, err
    entry = json.loads(stdout)["teachers"][0]
    assert entry["layout"] == "kdray" and entry["arch"] == "resnet8"
    assert abs(entry["test_acc"] - original["test_acc"]) <= 0.02  # measured again the way kdray measured it
    _assert_same_weights(out / "teacher_0.pt", fake_teachers / "teacher_0.pt")


@pytest.mark.parametrize("wrap", ["ddp_prefix", "state_dict_key", "model_key", "ddp_inside_state_dict"])
def test_wrapped_state_dicts_import(tmp_path, capsys, fake_teachers, wrap):
    state = torch.load(fake_teachers / "teacher_0.pt", weights_only=True)
    ddp = {f"module.{k}": v for k, v in state.items()}
    saved = {"ddp_prefix": ddp, "state_dict_key": {"state_dict": state, "epoch": 3},
             "model_key": {"model": state, "optimizer": {"lr": 0.1}},
             "ddp_inside_state_dict": {"state_dict": ddp}}[wrap]
    path = tmp_path / f"{wrap}.pth"
    torch.save(saved, path)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "teachers", "import", path, "--arch", "resnet8", "--out", out, *DATA)
    assert code == 0, err
    _assert_same_weights(out / "teacher_0.pt", fake_teachers / "teacher_0.pt")


def test_a_torchvision_file_with_a_ddp_prefix_imports(tmp_path, capsys, tv_resnet18):
    model, _ = tv_resnet18
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    code, _, err = run_cli(capsys, "teachers", "import", path, "--arch", "resnet18", "--out", tmp_path / "o", *DATA)
    assert code == 0, err
    assert torch.equal(load_teachers(tmp_path / "o").members[0].stem[0].weight, model.conv1.weight)


def test_a_file_holding_no_state_dict_is_one_line(tmp_path, capsys):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    code, _, err = run_cli(capsys, "teachers", "import", path, "--arch", "resnet8", "--out", tmp_path / "o", *DATA)
    assert code == 2 and "holds no state dict" in error_line(err)
    assert nothing_written(tmp_path, tmp_path / "o")


def test_torchvision_weights_from_the_hub_cache_get_a_new_head(tmp_path, capsys, monkeypatch):
    """--weights reads torchvision's weights from the torch hub cache (here a stand-in file with
    random ImageNet-shaped weights: nothing is downloaded) and re-initialises the 1000-class fc."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    imagenet = tvm.resnet18()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache / tvm.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1])
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "teachers", "import", "--weights", "DEFAULT", "--arch", "resnet18",
                                "--out", out, *DATA, "--json")
    assert code == 0, err
    entry = json.loads(stdout)["teachers"][0]
    assert entry["source"] == "ResNet18_Weights.IMAGENET1K_V1" and entry["reinitialised"] == "fc"
    assert "its classifier 'fc' was re-initialised for the 10 classes" in err
    teacher = load_teachers(out).members[0]
    assert torch.equal(teacher.stem[0].weight, imagenet.conv1.weight)  # the trunk is the pretrained one
    assert teacher.head[2].weight.shape == (10, 512)


def test_weights_of_another_model_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "teachers", "import", "--weights", "ResNet34_Weights.DEFAULT", "--arch",
                           "resnet18", "--out", tmp_path / "o", *DATA)
    assert code == 2 and "are not weights of 'resnet18'" in error_line(err)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "regnet_y_400mf"])
def test_torchvision_keys_load_into_kdrays_wrapper(name):
    """What the import does with a torchvision-layout file: the wrapper holds the same weights under
    kdray's keys (loadable into build_model's model) and computes the same logits."""
    torch.manual_seed(0)
    tv_model = tvm.get_model(name, num_classes=7).eval()
    wrapped = from_torchvision_state(name, tv_model.state_dict(), 7).eval()
    kd_state = wrapped.state_dict()
    assert all(k.startswith(("stem.", "stages.", "head.")) for k in kd_state)
    build_model(name, 7).load_state_dict(kd_state)  # strict
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), tv_model(x), atol=1e-6)


def _assert_same_weights(a, b) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
