"""Config loading, overrides and validation: every bad value is one ConfigError that names
the field, the value, the valid range and the fix; every shipped config is valid."""
import glob
import os
import textwrap

import ml_collections
import pytest

from amq_jax import config as config_mod
from amq_jax import errors
from amq_jax.config import ConfigError, load_config, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "resnet20_fmnist.py") + ":tiny"


def test_config_error_is_the_family_class():
  assert ConfigError is errors.ConfigError and issubclass(ConfigError, errors.AmqError)


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                                        if not os.path.basename(p).startswith("_")))
def test_every_shipped_config_and_variant_is_valid(path):
  load_config(path)
  if "tiny" in open(path).read():
    load_config(path + ":tiny")


# (override, field named, words of the valid range)
BAD_OVERRIDES = [
    ("train.batch_size=-5", "train.batch_size = -5", "integer >= 1"),
    ("train.batch_size=0", "train.batch_size = 0", "integer >= 1"),
    ("finetune.batch_size=0", "finetune.batch_size = 0", "integer >= 1"),
    ("hessian.batch_size=-1", "hessian.batch_size = -1", "integer >= 1"),
    ("train.learning_rate=0", "train.learning_rate = 0.0", "finite number > 0"),
    ("finetune.learning_rate=-0.1", "finetune.learning_rate = -0.1", "finite number > 0"),
    ("train.learning_rate=1e400", "train.learning_rate = inf", "finite number > 0"),
    ("train.learning_rate=nan", "train.learning_rate = nan", "finite number > 0"),
    ("train.momentum=1.0", "train.momentum = 1.0", "[0, 1)"),
    ("train.optimizer=rmsprop", "train.optimizer = 'rmsprop'", "'sgd', 'adam'"),
    ("train.num_epochs=0", "train.num_epochs = 0.0", "> 0"),
    ("hessian.rtol=0", "hessian.rtol = 0.0", "(0, 1)"),
    ("hessian.rtol=1", "hessian.rtol = 1.0", "(0, 1)"),
    ("hessian.min_probes=0", "hessian.min_probes = 0", "integer >= 1"),
    ("hessian.estimator=exact", "hessian.estimator = 'exact'", "'per_layer', 'joint'"),
    ("search.bit_choices=(2,99)", "search.bit_choices = (2, 99)", "1..16"),
    ("search.bit_choices=()", "search.bit_choices = ()", "non-empty"),
    ("search.bit_choices=(0,4)", "search.bit_choices = (0, 4)", "1..16"),
    ("search.act_bits=17", "search.act_bits = 17", "1..16"),
    ("search.budget=", "search.budget = ''", "'avg:3'"),
    ("search.budget=avg:-1", "search.budget = 'avg:-1'", "'avg:3'"),
    ("seed=-1", "seed = -1", "integer >= 0"),
    ("train_limit=0", "train_limit = 0", "integer >= 1 or None"),
    ("model_kwargs.num_classes=0", "model_kwargs.num_classes = 0", "integer >= 1"),
]


@pytest.mark.parametrize("override,named,valid", BAD_OVERRIDES, ids=[o for o, _, _ in BAD_OVERRIDES])
def test_bad_value_names_field_value_range_and_fix(override, named, valid):
  with pytest.raises(ConfigError) as e:
    load_config(TINY, [override])
  msg = str(e.value)
  assert named in msg and valid in msg, msg
  field = named.split(" = ")[0]
  assert f"fix: --config.{field}=" in msg and "\n" not in msg


def test_cross_field_checks():
  with pytest.raises(ConfigError, match=r"hessian.max_probes = 2 is smaller than "
                     r"hessian.min_probes = 4.*--config.hessian.max_probes=4"):
    load_config(TINY, ["hessian.max_probes=2"])
  with pytest.raises(ConfigError, match=r"search.pin_first_last = 5 is not one of "
                     r"search.bit_choices \(2, 3, 4, 8\)"):
    load_config(TINY, ["search.pin_first_last=5"])
  assert load_config(TINY, ["search.pin_first_last=0"]).search.pin_first_last == 0


def test_tie_patterns_must_compile_and_be_groups():
  with pytest.raises(ConfigError, match=r"search.tie .*regex '\[' does not compile"):
    load_config(TINY, ['search.tie=(("[",),)'])
  with pytest.raises(ConfigError, match=r"group 'a' is not a non-empty tuple"):
    load_config(TINY, ['search.tie=("a","b")'])
  cfg = load_config(TINY, ['search.tie=[["stage1_block1/conv2", "stage1_block2/conv2"]]'])
  assert cfg.search.tie == (("stage1_block1/conv2", "stage1_block2/conv2"),)


def test_overrides_are_converted_to_the_field_type():
  cfg = load_config(TINY, ["train.augment=false", "train.batch_size=1e2",
                           "train.learning_rate=1", "search.bit_choices=4",
                           "search.pin_first_last=4", "train_limit=None",
                           "search.budget=avg:3"])
  assert cfg.train.augment is False and cfg.train.batch_size == 100
  assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
  assert cfg.search.bit_choices == (4,) and cfg.train_limit is None
  assert cfg.search.budget == "avg:3"


@pytest.mark.parametrize("override,match", [
    ("train.batch_size=abc", r"train.batch_size = 'abc' has the wrong type: must be an integer"),
    ("train.batch_size=2.5", r"train.batch_size = 2.5 has the wrong type"),
    ("train.augment=maybe", r"train.augment = 'maybe' has the wrong type: must be True or False"),
    ("hessian=3", r"hessian is a section"),
    ("hessian.rtol.x=1", r"hessian.rtol is a value, not a section"),
    ("train.batch_size", r"must look like --config.FIELD=VALUE"),
    ("nope=1", r"unknown config field 'nope'"),
    ("hessian.batchsize=1", r"did you mean --config.hessian.batch_size"),
])
def test_malformed_overrides(override, match):
  with pytest.raises(ConfigError, match=match):
    load_config(TINY, [override])


def test_unknown_field_points_to_its_new_section():
  """After the move of optimization fields into c.train/c.finetune, the old spelling says
  where the field lives now."""
  with pytest.raises(ConfigError, match=r"did you mean .*--config.train.learning_rate"):
    load_config(TINY, ["learning_rate=0.1"])


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(textwrap.dedent(text))
  return str(p)


def test_schema_checks_fields_wherever_they_live(tmp_path):
  """The same fields at the top level (the older layout) and in sections are checked."""
  flat = _write(tmp_path, "flat.py", """
      import ml_collections
      def get_config():
        c = ml_collections.ConfigDict()
        c.model = 'resnet_tiny'
        c.batch_size = 64
        c.learning_rate = 0.1
        c.my_own_field = -7          # unknown to the schema: left alone
        return c
      """)
  assert load_config(flat).my_own_field == -7
  with pytest.raises(ConfigError, match=r"config field batch_size = -5 is invalid.*"
                     r"or edit .*flat.py"):
    load_config(flat, ["batch_size=-5"])
  with pytest.raises(ConfigError, match=r"learning_rate = 0.0"):
    load_config(flat, ["learning_rate=0"])


def test_several_problems_in_one_error(tmp_path):
  bad = _write(tmp_path, "bad.py", """
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict(dict(
            train=dict(batch_size=0, learning_rate=-1.0), hessian=dict(rtol=2.0)))
      """)
  with pytest.raises(ConfigError) as e:
    load_config(bad)
  msg = str(e.value)
  for part in ("train.batch_size = 0", "train.learning_rate = -1.0", "hessian.rtol = 2.0"):
    assert part in msg
  assert "\n" not in msg


@pytest.mark.parametrize("name,text,match", [
    ("syntax.py", "def get_config(:\n", r"syntax error at line 1"),
    ("raises.py", "def get_config():\n  raise RuntimeError('no GPU here')\n",
     r"get_config\(\) of config file .*raises.py raised RuntimeError: no GPU here"),
    ("top.py", "x = 1 / 0\n", r"failed to load: ZeroDivisionError"),
    ("noget.py", "A = 1\n", r"defines no get_config\(\)"),
    ("number.py", "def get_config():\n  return 3\n", r"returned a int"),
    ("config.txt", "whatever", r"is not a Python config file \(.py\)"),
])
def test_bad_config_files(tmp_path, name, text, match):
  path = _write(tmp_path, name, text)
  with pytest.raises(ConfigError, match=match):
    load_config(path)


def test_missing_file_directory_and_variant(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    load_config(str(tmp_path / "missing.py"))
  os.mkdir(tmp_path / "dir.py")
  with pytest.raises(ConfigError, match="is a directory"):
    load_config(str(tmp_path / "dir.py"))
  with pytest.raises(ConfigError, match=r"get_config\('huge'\) .* raised ValueError"):
    load_config(TINY.replace(":tiny", ":huge"))


def test_validate_config_for_python_callers():
  cfg = ml_collections.ConfigDict({"finetune": {"batch_size": 0}})
  with pytest.raises(ConfigError, match=r"finetune.batch_size = 0 .*integer >= 1"):
    validate_config(cfg)
  ok = ml_collections.ConfigDict({"finetune": {"batch_size": 8}, "anything": "else"})
  assert validate_config(ok) is ok


def test_batch_size_fields_are_in_the_schema():
  for f in config_mod.BATCH_SIZE_FIELDS:
    assert f in config_mod.SCHEMA
