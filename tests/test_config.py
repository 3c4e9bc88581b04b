import dataclasses

import pytest

from model import ASDAConfig


def test_defaults_are_the_base_model():
    c = ASDAConfig()
    assert (c.embed_dim, c.depth, c.num_heads, c.target_length) == (768, 12, 12, 1024)
    assert c.grid == (64, 8) and c.num_patches == 512
    assert c.num_students == 16 and c.mask_ratio == 0.8 and c.alpha == 0.5


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("diff_lambda", 1.0, "[0, 1)"),
        ("diff_lambda", -0.1, "[0, 1)"),
        ("cls_position", "tail", "'head', 'middle', 'none'"),
        ("target_length", 1000, "multiple of patch_size"),
        ("num_students", 0, "positive integer"),
        ("attention", "linear", "'differential', 'standard'"),
        ("diff_norm", "batchnorm", "'layernorm', 'headwise_rms'"),
        ("pos_embed", "rope", "'sincos2d', 'learned1d'"),
        ("embed_dim", 100, "multiple of num_heads"),
        ("mask_ratio", 1.0, "(0, 1)"),
        ("average_top_k_layers", 13, "depth"),
        ("alpha", -1.0, ">= 0"),
        ("ema_decay_start", 1.5, "ema_decay_start <= ema_decay_end"),
        ("lambda_init", 1.0, "[0, 1)"),
        ("loss_reduction", "sum", "'release', 'mean'"),
    ],
)
def test_bad_config_raises_error_naming_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as err:
        ASDAConfig(**{field: value})
    message = str(err.value)
    assert field in message and repr(value) in message and allowed in message


def test_optional_lambda_init_takes_null_or_a_number_from_a_command_line():
    config = ASDAConfig.tiny()
    assert config.with_overrides(["lambda_init=0.1"]).lambda_init == 0.1
    assert config.with_overrides(["lambda_init=0.1"]).with_overrides(["lambda_init=null"]).lambda_init is None


def test_dict_and_yaml_round_trip(tmp_path):
    c = ASDAConfig.tiny(diff_lambda=0.5, cls_position="middle", learnable_lambda=True)
    assert ASDAConfig.from_dict(c.to_dict()) == c
    path = tmp_path / "c.yaml"
    c.to_yaml(path)
    assert ASDAConfig.from_yaml(path) == c


def test_unknown_field_is_rejected_with_the_allowed_names():
    with pytest.raises(ValueError, match="unknown ASDAConfig field.*lamda.*allowed"):
        ASDAConfig.from_dict({"lamda": 0.3})


def test_command_line_overrides_are_typed():
    c = ASDAConfig.tiny().with_overrides(["diff_lambda=0", "learnable_lambda=true", "num_students=8"])
    assert c.diff_lambda == 0.0 and isinstance(c.diff_lambda, float)
    assert c.learnable_lambda is True and c.num_students == 8
    with pytest.raises(ValueError, match="field=value"):
        c.with_overrides(["diff_lambda"])
    with pytest.raises(ValueError, match="num_students"):
        c.with_overrides(["num_students=many"])


def test_sweeps_derive_variants_with_replace():
    c = dataclasses.replace(ASDAConfig.tiny(), alpha=2.0)
    assert c.alpha == 2.0
    with pytest.raises(ValueError, match="alpha"):
        dataclasses.replace(c, alpha=-1.0)


@pytest.mark.parametrize("assignment, value", [("diff_lambda=1e-1", 0.1), ("alpha=5E-1", 0.5), ("alpha=2", 2.0),
                                               ("num_students=3", 3)])
def test_overrides_accept_every_python_number_literal(assignment, value):
    field = assignment.split("=")[0]
    assert getattr(ASDAConfig().with_overrides([assignment]), field) == value


@pytest.mark.parametrize("assignment", ["alpha=.inf", "alpha=.nan", "diff_lambda=inf", "mlp_ratio=-.inf"])
def test_non_finite_numbers_are_rejected_naming_the_field(assignment):
    with pytest.raises(ValueError, match=rf"ASDAConfig.{assignment.split('=')[0]}=.* expected a finite number"):
        ASDAConfig().with_overrides([assignment])


def test_a_config_file_with_a_repeated_key_or_bad_syntax_names_the_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("depth: 2\ndepth: 4\n")
    with pytest.raises(ValueError, match=rf"config {path} is not valid YAML: key 'depth' appears twice"):
        ASDAConfig.from_yaml(path)
    path.write_text("depth: [2\n")
    with pytest.raises(ValueError, match=rf"config {path} is not valid YAML"):
        ASDAConfig.from_yaml(path)
