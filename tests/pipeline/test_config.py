"""Configuration: params.yaml layers, --set overrides, typed validation, the lr schedule."""

from __future__ import annotations

import pytest
import yaml

from fss.errors import ConfigError
from pipeline.config import (
    config_from_dict,
    load_params,
    parse_set_values,
    resolve_params_section,
    resolve_run_config,
)
from pipeline.train import learning_rate


def _write(tmp_path, data) -> str:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


LAYERED = {
    "defaults": {"optim": {"lr": 1.0, "momentum": 0.5}, "train": {"iterations": 10}},
    "methods": {
        "pfenet": {
            "optim": {"lr": 2.0},
            "train": {"epochs": 3},
            "knobs": {"aux_weight": 0.5},
            "datasets": {"pascal": {"optim": {"lr": 4.0}}, "synthetic": {"knobs": {"reduce_dim": 32}}},
        }
    },
    "datasets": {"pascal": {"optim": {"lr": 3.0, "weight_decay": 0.25}}, "synthetic": {"train": {"iterations": 7}}},
}


def test_layers_apply_in_order(tmp_path):
    path = _write(tmp_path, LAYERED)
    c = resolve_run_config(method="pfenet", dataset="pascal", fold=1, shot=1, params_path=path)
    # defaults < methods.M < datasets.D < methods.M.datasets.D
    assert c.optim.lr == 4.0 and c.optim.weight_decay == 0.25 and c.optim.momentum == 0.5
    assert c.train.epochs == 3 and c.train.iterations is None  # the method's epochs cleared iterations
    assert c.knobs["aux_weight"] == 0.5 and c.knobs["reduce_dim"] == 256
    s = resolve_run_config(method="pfenet", dataset="synthetic", fold=1, shot=1, params_path=path)
    assert s.train.iterations == 7 and s.train.epochs is None  # the dataset layer's iterations wins
    assert s.optim.lr == 2.0 and s.knobs["reduce_dim"] == 32
    # CLI options and --set come last
    o = resolve_run_config(method="pfenet", dataset="pascal", fold=1, shot=1, params_path=path, epochs=2,
                           set_values=["lr=0.5", "knobs.aux_weight=2", "validation.select=best"])
    assert o.optim.lr == 0.5 and o.train.epochs == 2 and o.knobs["aux_weight"] == 2.0
    assert o.validation.select == "best"
    assert o.provenance["set"] == {"optim.lr": 0.5, "knobs.aux_weight": 2, "validation.select": "best"}


def test_config_round_trips_through_yaml(tmp_path):
    c = resolve_run_config(method="apanet", dataset="synthetic", fold=2, shot=1,
                           set_values=["backbone_weights=w/{backbone}-f{fold}.pt", "lam=0.3"])
    assert c.backbone_weights == "w/small-f2.pt" and c.knobs["lam"] == 0.3
    again = config_from_dict(yaml.safe_load(c.to_yaml()))
    assert again == c and again.flat() == c.flat()


@pytest.mark.parametrize(
    "sets, needles",
    [
        (["train.batch_size=abc"], ["train.batch_size", "int", "'abc'"]),
        (["optim.momentum=2"], ["optim.momentum", "[0.0, 1.0]"]),
        (["validation.select=worst"], ["validation.select", "last, best"]),
        (["episodes=3"], ["ambiguous", "validation.episodes", "test.episodes"]),
        (["no_such_key=1"], ["unknown key", "optim.lr", "knobs.lam"]),
        (["optim.nope=1"], ["section 'optim' has no key 'nope'", "lr"]),
        (["knobs.nope=1"], ["no knob 'nope'", "lam"]),
        (["lam=7"], ["knob 'lam'", "[0.0, 1.0]"]),
        (["lr"], ["KEY=VALUE"]),
        (["fold=2"], ["--fold"]),
    ],
)
def test_bad_overrides_name_the_key(sets, needles):
    with pytest.raises(ConfigError) as info:
        resolve_run_config(method="apanet", dataset="synthetic", fold=0, shot=1, set_values=sets)
    message = str(info.value)
    assert "\n" not in message
    for n in needles:
        assert n in message, (n, message)


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        (dict(method="nonet"), ["unknown method 'nonet'", "apanet", "pfenet"]),
        (dict(backbone="vgg99"), ["unknown backbone 'vgg99'", "resnet50v2"]),
        (dict(dataset="voc"), ["unknown dataset 'voc'", "pascal, coco, synthetic"]),
        (dict(fold=4), ["unknown fold 4", "0, 1, 2, 3"]),
        (dict(shot=0), ["shot 0"]),
        (dict(iterations=5, epochs=2), ["--iterations or --epochs"]),
    ],
)
def test_bad_choices_list_valid_ones(kwargs, needles):
    args = dict(method="pfenet", dataset="synthetic", fold=0, shot=1)
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        resolve_run_config(**args)
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def test_bad_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    path = _write(tmp_path, {"defaults": {"optim": {"lr": "fast"}, "train": {"iterations": 3}}})
    with pytest.raises(ConfigError, match="optim.lr must be float, got 'fast'"):
        resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, params_path=path)
    path = _write(tmp_path, {"defaults": {"optim": {"lr": 0.1}}})
    with pytest.raises(ConfigError, match="no length"):
        resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, params_path=path)


@pytest.mark.parametrize(
    "data, needles",
    [
        ({"methods": {"pfenett": {"optim": {"lr": 0.1}}}}, ["methods has no method 'pfenett'", "pfenet", "apanet"]),
        ({"methods": {"pfenet": {"optim": {"lrr": 0.1}}}}, ["methods.pfenet.optim has no key 'lrr'", "weight_decay"]),
        ({"methods": {"apanet": {"knobs": {"lamda": 0.1}}}}, ["methods.apanet.knobs has no knob 'lamda'", "lam"]),
        ({"methods": {"pfenet": {"knobs": {"lam": 0.1}}}}, ["methods.pfenet.knobs has no knob 'lam'", "reduce_dim"]),
        ({"methods": {"pfenet": {"datasets": {"cocoa": {}}}}}, ["methods.pfenet.datasets has no dataset 'cocoa'", "coco"]),
        ({"methods": {"pfenet": {"datasets": {"coco": {"trian": {}}}}}},
         ["methods.pfenet.datasets.coco has no key 'trian'", "train"]),
        ({"methods": {"pfenet": {"optimizer": {}}}}, ["methods.pfenet has no key 'optimizer'", "optim"]),
        ({"datasets": {"pascl": {}}}, ["datasets has no dataset 'pascl'", "pascal"]),
        ({"datasets": {"pascal": {"data": {"rooot": "x"}}}}, ["datasets.pascal.data has no key 'rooot'", "root"]),
        ({"datasets": {"pascal": {"datasets": {}}}}, ["datasets.pascal has no key 'datasets'"]),
        ({"defaults": {"tracking": {"wandbb": True}}}, ["defaults.tracking has no key 'wandbb'", "wandb"]),
        ({"default": {}}, ["the top level has no section 'default'", "defaults"]),
        ({"prepare": {"sed": 1}}, ["prepare has no key 'sed'", "train_images"]),
        ({"benchmark": {"method": []}}, ["benchmark has no key 'method'", "methods"]),
        ({"methods": {"pfenet": [1]}}, ["methods.pfenet must be a mapping"]),
    ],
)
def test_unknown_params_sections_and_keys_are_refused(tmp_path, data, needles):
    # issue 17: a misspelt methods.pfenett section was skipped and the run used the default lr
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for n in needles:
        assert n in message, (n, message)
    with pytest.raises(ConfigError):
        resolve_run_config(method="pfenet", dataset="pascal", fold=0, shot=1, params_path=path)


def test_known_params_sections_load(tmp_path):
    path = _write(tmp_path, {**LAYERED, "prepare": {"seed": 1}, "pretrain": {"lr": 0.1}, "benchmark": {"folds": [0]},
                             "methods": {**LAYERED["methods"], "canet": None}})
    params, _ = load_params(path)
    assert params["prepare"] == {"seed": 1}


def test_params_section_resolution():
    defaults = {"epochs": 6, "lr": 0.02, "channels_last": False}
    params = {"pretrain": {"epochs": "8", "channels_last": True}}
    out = resolve_params_section(params, "pretrain", defaults, {"lr": 0.5, "epochs": None})
    assert out == {"epochs": 8, "lr": 0.5, "channels_last": True} and isinstance(out["lr"], float)
    assert resolve_params_section({}, "pretrain", defaults) == defaults
    for bad, needle in [({"pretrain": {"epoch": 1}}, "pretrain has no key 'epoch'; its keys are: epochs, lr"),
                        ({"pretrain": {"channels_last": "maybe"}}, "pretrain.channels_last must be true or false"),
                        ({"pretrain": {"epochs": 1.5}}, "pretrain.epochs must be int, got 1.5"),
                        ({"pretrain": [1]}, "params key pretrain must be a mapping")]:
        with pytest.raises(ConfigError, match=needle):
            resolve_params_section(bad, "pretrain", defaults)


def test_set_values_are_parsed_as_yaml():
    assert parse_set_values(["a=1", "b=0.5", "c=true", "d=[1, 2]", "e=null", "f=text"]) == {
        "a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": None, "f": "text"}


def test_repo_params_cover_every_registered_method(repo_params):
    from fss.models.registry import list_methods

    params, _ = load_params(repo_params)
    methods = list_methods()
    assert sorted(params["benchmark"]["methods"]) == methods
    assert set(methods) <= set(params["methods"])
    synthetic = params["datasets"]["synthetic"]
    for m in methods:
        syn = resolve_run_config(method=m, dataset="synthetic", fold=0, shot=1, params_path=repo_params)
        preset = params["methods"][m].get("datasets", {}).get("synthetic", {}).get("train", {})
        assert syn.train.iterations == preset.get("iterations", synthetic["train"]["iterations"])
        assert syn.data.train_size == synthetic["data"]["train_size"] == syn.test.size
        for ds in ("pascal", "coco"):
            real = resolve_run_config(method=m, dataset=ds, fold=0, shot=1, params_path=repo_params)
            assert real.optim.lr <= 0.005 and real.data.train_size in (None, 321, 641)
            assert real.validation.seed not in (321, 0, 1234)
    sim = resolve_run_config(method="simpropnet", dataset="synthetic", fold=0, shot=1, params_path=repo_params)
    assert (sim.train.iterations, sim.train.batch_size, sim.validation.every) == (4800, 8, 200)
    pf = resolve_run_config(method="pfenet", dataset="pascal", fold=0, shot=1, params_path=repo_params)
    assert (pf.optim.lr, pf.train.batch_size, pf.train.epochs, pf.schedule.name) == (0.0025, 4, 200, "poly")
    assert pf.optim.pfenet_lr_x10 is False and pf.knobs["backbone_bn_train"] is False
    coco = resolve_run_config(method="pfenet", dataset="coco", fold=0, shot=1, params_path=repo_params)
    assert (coco.optim.lr, coco.train.batch_size, coco.train.epochs) == (0.005, 8, 50)
    panet = resolve_run_config(method="panet", dataset="pascal", fold=0, shot=1, params_path=repo_params)
    assert (panet.optim.lr, panet.train.iterations, panet.schedule.name) == (0.001, 30000, "step")


def test_learning_rate_schedules():
    base = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1,
                              set_values=["lr=0.1", "schedule.name=poly", "power=0.9"])
    total = 10
    assert learning_rate(base, 0, total) == pytest.approx(0.1 * 0.9 ** 0.9)  # PFENet: curr_iter = it + 1
    assert learning_rate(base, 9, total) == 0.0
    step = resolve_run_config(method="panet", dataset="synthetic", fold=0, shot=1,
                              set_values=["lr=1.0", "schedule.name=step", "milestones=[0.3333333, 0.6666667]", "gamma=0.1"])
    lrs = [learning_rate(step, it, 30000) for it in (0, 9999, 10000, 19999, 20000, 29999)]
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    const = resolve_run_config(method="canet", dataset="synthetic", fold=0, shot=1,
                               set_values=["lr=0.3", "schedule.name=constant", "optim.pfenet_lr_x10=true"])
    assert learning_rate(const, 5, 10) == pytest.approx(3.0)
    warm = resolve_run_config(method="canet", dataset="synthetic", fold=0, shot=1,
                              set_values=["lr=1.0", "schedule.name=constant", "warmup_iterations=4"])
    assert [learning_rate(warm, i, 10) for i in (0, 3, 4)] == pytest.approx([0.25, 1.0, 1.0])


def test_num_workers_auto_follows_the_folds_share_of_the_cores(monkeypatch):
    """data.num_workers: auto (the pascal and coco presets) is this fold's share of the cores less
    one for the training process, at most 8; the run's config records the number used."""
    import pipeline.config as C

    def workers(dataset="pascal", sets=()):
        return C.resolve_run_config(method="pfenet", dataset=dataset, fold=0, shot=1, backbone="resnet50v2",
                                    iterations=None, epochs=None, device="cpu", params_path=None,
                                    set_values=list(sets)).data.num_workers

    monkeypatch.setattr(C, "usable_cores", lambda: 32)
    monkeypatch.delenv(C.CPU_SHARE_ENV, raising=False)
    assert workers() == workers("coco") == C.AUTO_WORKERS_MAX  # one fold alone on 32 cores
    monkeypatch.setenv(C.CPU_SHARE_ENV, "4")  # e.g. 4 folds at once on 16 cores
    assert workers() == 3
    monkeypatch.setenv(C.CPU_SHARE_ENV, "1")
    assert workers() == 0
    assert workers(sets=["data.num_workers=5"]) == 5
    assert workers("synthetic") == 1  # the embedded preset keeps its number
    with pytest.raises(ConfigError, match="num_workers"):
        workers(sets=["data.num_workers=many"])
