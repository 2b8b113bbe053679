import pytest
import timm
import torch
import torch.nn as nn
from torchvision import models as tv_models

from common.config import FAMILIES, run_defaults
from trainable.models import STUDENT_ARCHS, TeacherEnsemble, create_student, create_teacher, freeze, teacher_head

torch.set_num_threads(1)


def student_model(**given) -> nn.Module:
    """create_student of the schema's student.* (run_defaults) for every family, with `given` over them."""
    return create_student(**(run_defaults()["student"] | {"num_classes": len(FAMILIES)} | given))


def teacher_model(name: str, **given) -> nn.Module:
    """create_teacher of the schema's teacher.pretrained and teacher.freeze for every family, `given` over them."""
    teacher = run_defaults()["teacher"]
    return create_teacher(
        name,
        **(
            {"num_classes": len(FAMILIES), "pretrained": teacher["pretrained"], "freeze_backbone": teacher["freeze"]}
            | given
        ),
    )


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(module for module in model.modules() if isinstance(module, nn.Conv2d))


@pytest.mark.parametrize("arch", STUDENT_ARCHS)
@pytest.mark.parametrize("n_mels", [32, 64, 128])
def test_student_takes_one_channel_any_n_mels(arch, n_mels):
    model = student_model(arch=arch, width_mult=0.5, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, n_mels, 40))
    assert logits.shape == (2, 7)
    assert _first_conv(model).in_channels == 1


@pytest.mark.parametrize("arch", STUDENT_ARCHS)
def test_student_stem_keeps_torchvision_geometry(arch):
    reference = _first_conv(getattr(tv_models, arch)(weights=None, width_mult=0.75))
    stem = _first_conv(student_model(arch=arch, width_mult=0.75))
    assert (stem.in_channels, stem.out_channels) == (1, reference.out_channels)
    assert (stem.kernel_size, stem.stride, stem.padding) == (reference.kernel_size, reference.stride, reference.padding)
    assert stem.weight.std() > 0  # initialised, not left at zeros


def test_student_head_and_dropout_follow_arguments():
    model = student_model(num_classes=11, dropout=0.3)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == 11
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3]


def test_width_mult_shrinks_the_student():
    def n_params(width: float) -> int:
        return sum(p.numel() for p in student_model(width_mult=width).parameters())

    assert n_params(0.5) < n_params(0.75) < n_params(1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet18"}, "mobilenet_v3_small"),  # the message lists the registry
        ({"width_mult": 0.0}, "width_mult"),
        ({"num_classes": 0}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_student_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        student_model(**kwargs)


def test_teacher_output_and_mono_stem():
    model = teacher_model("resnet10t", num_classes=11).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 48, 40)).shape == (2, 11)
    assert _first_conv(model).in_channels == 1


def test_teacher_reloads_its_own_checkpoint_exactly(tmp_path):
    torch.manual_seed(0)
    trained = teacher_model("resnet10t", num_classes=11).eval()
    path = tmp_path / "teacher.pth"
    torch.save(trained.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality can only come from the file
    reloaded = teacher_model("resnet10t", num_classes=11, pretrained=str(path)).eval()
    x = torch.randn(2, 1, 32, 40)
    with torch.no_grad():
        assert torch.equal(trained(x), reloaded(x))


def test_teacher_from_imagenet_style_file_sums_rgb_stem_and_drops_head(tmp_path):
    imagenet = timm.create_model("resnet10t", pretrained=False, in_chans=3, num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = teacher_model("resnet10t", num_classes=11, pretrained=path)
    rgb_stem = _first_conv(imagenet).weight
    assert torch.allclose(_first_conv(model).weight, rgb_stem.sum(dim=1, keepdim=True))
    assert model.get_classifier().out_features == 11


def test_any_timm_model_is_a_teacher_and_freeze_leaves_only_its_head_trainable():
    model = teacher_model("mobilenetv3_small_050", num_classes=5, freeze_backbone=True)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 48, 40)).shape == (2, 5)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"classifier.{n}" for n, _ in model.get_classifier().named_parameters()}


def test_hf_audio_teacher_gets_a_head_for_our_classes(tmp_path):
    from tests.test_teacher import save_tiny_ast

    folder = save_tiny_ast(tmp_path / "ast")
    model = teacher_model(f"hf:{folder}", num_classes=4, freeze_backbone=True)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 64, 32)).shape == (2, 4)  # (batch, frames, mel bins) -> our 4 families
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("model.classifier.") for name in trainable)
    assert set(teacher_head(model).parameters()) == {p for p in model.parameters() if p.requires_grad}


def test_teacher_rejects_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model 'resnet_nope'"):
        teacher_model("resnet_nope")
    with pytest.raises(ValueError, match="does not exist"):
        teacher_model("resnet10t", pretrained=str(tmp_path / "missing.pth"))


def test_ensemble_averages_logits_and_freeze_stops_training():
    teachers = [freeze(student_model(width_mult=0.5, num_classes=5)) for _ in range(2)]
    ensemble = TeacherEnsemble(teachers)
    x, y = torch.randn(2, 1, 32, 40), torch.randn(2, 1, 48, 40)  # members may read different inputs
    expected = (teachers[0](x) + teachers[1](y)) / 2
    assert torch.allclose(ensemble([x, y]), expected)
    assert all(not p.requires_grad for p in ensemble.parameters())
    assert not any(m.training for teacher in teachers for m in teacher.modules())
    with pytest.raises(ValueError, match="at least one"):
        TeacherEnsemble([])
