"""Issue 34: nothing that comes from outside (a dataset and its label files, a recipe, a checkpoint, an upload, the
environment) runs a program, writes or reads outside its folder, exhausts the machine, or leaks a secret. One
test per hole found, each of which failed before its fix; a few more pin down what was judged no risk."""

import copy
import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import free_port, start_server
from imagenet_fixtures import _add, tiny_jpeg
from imagenet_resnet.config import Config, ConfigError, load_config
from imagenet_resnet.data.classes import ilsvrc2012_ids, imagenet_classes
from imagenet_resnet.data.prepare import prepare
from imagenet_resnet.data.sources import SourceError, open_source, unpack_gzip_tar
from imagenet_resnet.errors import UserError
from imagenet_resnet.models import build_model, load_weights

REPO = Path(__file__).resolve().parents[1]
WNIDS = list(imagenet_classes())


# --- label files ------------------------------------------------------------------------------------------------

def _kaggle(root: Path, solution: str | bytes, mapping: str | None = None) -> Path:
    """A Kaggle layout without training images: enough for open_source(..., val_only=True)."""
    (root / "ILSVRC" / "Data" / "CLS-LOC" / "val").mkdir(parents=True)
    for k in range(2):
        (root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / f"ILSVRC2012_val_0000000{k + 1}.JPEG").write_bytes(tiny_jpeg(k))
    names = imagenet_classes()
    (root / "LOC_synset_mapping.txt").write_text(mapping or "".join(f"{w} {names[w]}\n" for w in WNIDS))
    solution = solution if isinstance(solution, bytes) else solution.encode()
    (root / "LOC_val_solution.csv").write_bytes(solution)
    return root


GOOD_SOLUTION = ("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n"
                 "ILSVRC2012_val_00000002,n01443537 1\n")


def _official(root: Path, truth: bytes) -> Path:
    """The official layout without the train tar: two validation images and a devkit with `truth`."""
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for k in range(2):
            _add(tar, f"ILSVRC2012_val_0000000{k + 1}.JPEG", tiny_jpeg(k))
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return root


def _tiny(root: Path, annotations: str, wnids: str = "n01443537\nn01629819\n") -> Path:
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text(wnids)
    for k in range(2):
        (root / "val" / "images" / f"val_{k}.JPEG").write_bytes(tiny_jpeg(k))
    (root / "val" / "val_annotations.txt").write_text(annotations)
    return root


HOSTILE_LABEL_FILES = {  # name -> (layout builder, what the one line says)
    "csv without its columns": (lambda r: _kaggle(r, "ImageId,Other\nx,y\n"), r"LOC_val_solution.csv:1: the header"),
    "csv row without a class": (lambda r: _kaggle(r, GOOD_SOLUTION + "ILSVRC2012_val_00000003,\n"),
                                r"LOC_val_solution.csv:4: ILSVRC2012_val_00000003 has no class"),
    "csv field of 200 kB": (lambda r: _kaggle(r, "ImageId,PredictionString\n" + "A" * 200_000 + ",n01440764\n"),
                            r"LOC_val_solution.csv:2: not readable CSV \(field larger than field limit"),
    "csv not UTF-8": (lambda r: _kaggle(r, GOOD_SOLUTION.encode() + b"\xff,x\n"),
                      rf"LOC_val_solution.csv:4: not UTF-8 text \(byte {len(GOOD_SOLUTION)}\)"),
    "csv image listed twice": (lambda r: _kaggle(r, GOOD_SOLUTION + "ILSVRC2012_val_00000001,n01443537\n"),
                               r"LOC_val_solution.csv:4: the ImageId 'ILSVRC2012_val_00000001' is listed twice"),
    "mapping with a class twice": (lambda r: _kaggle(r, GOOD_SOLUTION, "n01440764 a\nn01440764 b\n"),
                                   r"LOC_synset_mapping.txt:2: the class ID 'n01440764' is listed twice"),
    "ground truth with a word": (lambda r: _official(r, b"1\nthree\n"),
                                 r"ILSVRC2012_validation_ground_truth.txt:2: 'three' is not a class number 1..1000"),
    "ground truth 0 (was the last class)": (lambda r: _official(r, b"0\n1\n"), r"ground_truth.txt:1: '0' is not"),
    "ground truth -3": (lambda r: _official(r, b"-3\n1\n"), r"ground_truth.txt:1: '-3' is not"),
    "ground truth 5000": (lambda r: _official(r, b"5000\n1\n"), r"ground_truth.txt:1: '5000' is not"),
    "ground truth of 5000 digits": (lambda r: _official(r, b"9" * 5000 + b"\n1\n"), r"ground_truth.txt:1: '999"),
    "wnids with ../": (lambda r: _tiny(r, "", "../../../../etc\n"),
                       r"wnids.txt:1: the class ID '../../../../etc' is a path"),
    "annotations with ../": (lambda r: _tiny(r, "val_0.JPEG\tn01443537\n../../../secret.JPEG\tn01629819\n"),
                             r"val_annotations.txt:2: the file name '../../../secret.JPEG' is a path, not a name"),
    "annotations with an absolute path": (lambda r: _tiny(r, "/etc/passwd\tn01443537\n"),
                                          r"val_annotations.txt:1: the file name '/etc/passwd' is a path"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LABEL_FILES))
def test_a_hostile_label_file_is_one_line_naming_the_file_and_line(tmp_path, case):
    build, said = HOSTILE_LABEL_FILES[case]
    (tmp_path / "secret.JPEG").write_bytes(tiny_jpeg(9))  # what ../../../secret.JPEG would have reached
    with pytest.raises(SourceError, match=said) as refused:
        open_source(build(tmp_path / "source"), val_only=True)
    assert "\n" not in str(refused.value)


def test_a_devkit_is_read_for_its_ground_truth_alone_never_its_meta_mat(tmp_path):
    """scipy's MAT reader (native code) crashed with a segmentation fault on a meta.mat with one byte changed,
    found by fuzzing: meta.mat is no longer handed to it (the packaged table is the same)."""
    root = _official(tmp_path / "source", b"1\n2\n")
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", b"MATLAB 5.0 MAT-file" + bytes(200))  # not a table
        _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"1\n2\n")
    val = open_source(root, val_only=True).splits["val"]
    ids = ilsvrc2012_ids()
    assert sorted(val.labels.tolist()) == sorted(WNIDS.index(ids[k]) for k in (0, 1))


# --- archives, trees of images and links -------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*classes have no val images")
def test_tar_members_are_never_extracted_and_links_and_devices_in_them_are_not_images(tmp_path):
    """Not a risk, pinned down: the tars are read in place by byte ranges (no member is ever written out, so a
    `../` or absolute name writes nothing), and only regular members are listed (a symlink, hard link or device
    member is no image). A member claiming more bytes than the tar holds is refused by tarfile itself."""
    root = _official(tmp_path / "source", b"1\n2\n3\n")
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        _add(tar, "../../ILSVRC2012_val_00000001.JPEG", tiny_jpeg(1))
        _add(tar, "/abs/ILSVRC2012_val_00000002.JPEG", tiny_jpeg(2))
        for kind, target in ((tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "/etc/shadow"), (tarfile.CHRTYPE, "")):
            member = tarfile.TarInfo("ILSVRC2012_val_00000003.JPEG")
            member.type, member.linkname = kind, target
            tar.addfile(member)
    val = open_source(root, val_only=True).splits["val"]
    assert sorted(os.fsdecode(n) for n in val.names) == ["../../ILSVRC2012_val_00000001.JPEG",
                                                         "/abs/ILSVRC2012_val_00000002.JPEG"]
    prepare(root, tmp_path / "out", pack=True, workers=1, val_only=True)
    assert not (tmp_path / "ILSVRC2012_val_00000001.JPEG").exists() and not Path("/abs").exists()
    lying = tarfile.TarInfo("ILSVRC2012_val_00000001.JPEG")
    lying.size = 10**11  # 100 GB declared, none there
    (root / "ILSVRC2012_img_val.tar").write_bytes(lying.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(SourceError, match="not a readable uncompressed tar"):
        open_source(root, val_only=True)


def test_a_link_to_a_device_or_a_fifo_is_left_out_not_read(tmp_path):
    """A tree's link to /dev/zero was read until memory ran out, and one to a FIFO waited forever. In a process
    of its own, with 2 GiB of address space and a minute."""
    root = _tiny(tmp_path / "source", "val_0.JPEG\tn01443537\nval_1.JPEG\tn01629819\nzero.JPEG\tn01443537\n"
                                      "fifo.JPEG\tn01629819\n")
    (root / "val" / "images" / "zero.JPEG").symlink_to("/dev/zero")
    os.mkfifo(root / "val" / "images" / "fifo.JPEG")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from imagenet_resnet.data.prepare import prepare; "
            "prepare(sys.argv[1], sys.argv[2], workers=1, val_only=True)")
    done = subprocess.run([sys.executable, "-c", code, str(root), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = (tmp_path / "out" / "problems.tsv").read_text().splitlines()[1:]
    assert sorted(row.split("\t")[1].rsplit("/", 1)[-1] for row in rows) == ["fifo.JPEG", "zero.JPEG"]
    assert all("not a regular file" in row for row in rows)


def test_names_with_control_characters_or_foreign_bytes_stay_one_escaped_line(tmp_path, capsys):
    """A name with a carriage return and a terminal escape split problems.tsv's row (and coloured the terminal);
    a name not in ASCII stopped the prepare with a traceback."""
    root = tmp_path / "source"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            (root / split / c / "good.JPEG").write_bytes(tiny_jpeg(ord(c), 40))
    (root / "train" / "a" / "bad\r\nname\x1b[31m.JPEG").write_bytes(b"not an image")
    (root / "train" / "a" / "ünï.JPEG").write_bytes(tiny_jpeg(3, 40))
    with open(os.fsencode(root / "train" / "b") + b"/\xff\xfe.JPEG", "wb") as not_utf8:
        not_utf8.write(tiny_jpeg(4, 40))
    manifest = prepare(root, tmp_path / "out", workers=1)
    assert manifest["splits"]["train"]["images"] == 4
    lines = (tmp_path / "out" / "problems.tsv").read_bytes().splitlines()
    assert len(lines) == 2 and b"bad\\r\\nname\\x1b[31m.JPEG\tunreadable" in lines[1]
    assert "\x1b" not in capsys.readouterr().out


def test_a_gzip_bomb_is_refused_before_it_fills_the_disk(tmp_path):
    """ImageNet-V2's .tar.gz is decompressed once: one whose stream holds far more than its trailer says was
    written out whole (a 65 kB file, 64 MiB here; a 100 MB one, 100 GB) before gzip's own check at its end."""
    archive = tmp_path / "imagenetv2-matched-frequency.tar.gz"
    with gzip.open(archive, "wb", compresslevel=9) as f:
        for _ in range(64):
            f.write(bytes(1 << 20))
    data = bytearray(archive.read_bytes())
    data[-4:] = (1000).to_bytes(4, "little")  # the trailer: 1,000 bytes uncompressed
    archive.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="decompression bomb") as refused:
        unpack_gzip_tar(archive, tmp_path / "source")
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in (tmp_path / "source").iterdir()) == [".written-by-imagenet-resnet"]


def test_links_leading_out_of_the_source_are_followed_here_but_never_uploaded(tmp_path):
    """A tree made elsewhere could link to any photo on this machine, and `prepare --out URL --pack` published it
    in a shard. Links are followed for a local prepare (subsets made of links), refused for an upload."""
    root = tmp_path / "source"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            (root / split / c / "good.JPEG").write_bytes(tiny_jpeg(ord(c), 40))
    photo = tmp_path / "home" / "Pictures" / "passport.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(tiny_jpeg(77, 40))
    (root / "train" / "a" / "zz.JPEG").symlink_to(photo)
    bucket = tmp_path / "bucket"
    with pytest.raises(UserError, match=r"train/a/zz.JPEG: a link to .*passport.jpg, outside .*source/train; "
                                        r"prepare does not upload"):
        prepare(root, f"file://{bucket}", pack=True, workers=1, work_dir=tmp_path / "work")
    assert not any(photo.read_bytes() in p.read_bytes() for p in bucket.rglob("*") if p.is_file())
    assert prepare(root, tmp_path / "local", pack=True, workers=1)["splits"]["train"]["images"] == 3


# --- recipes ----------------------------------------------------------------------------------------------------

def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_recipe_of_nested_aliases_is_refused_at_once(tmp_path):
    """Nine lines of YAML aliases, each repeating the last nine times: loaded as shared references in no time, but
    copied out by dataclasses.asdict (config.yaml, every checkpoint) into 9**8 lists: minutes and gigabytes."""
    letters = "abcdefghi"
    items = ["&a [1, 2, 3]"] + [f"&{letters[k]} [" + ", ".join([f"*{letters[k - 1]}"] * 9) + "]" for k in range(1, 9)]
    recipe = _recipe(tmp_path, "train:\n  total_steps: 10\n  schedule_knots: [" + ", ".join(items) + "]\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"train.schedule_knots: expected \[\[step, recipe step, rate\], ...\]"):
        load_config(recipe)
    assert time.monotonic() - started < 5


HOSTILE_RECIPES = {  # name -> (recipe, what the one line says)
    "epochs 10**18": ("train:\n  epochs: 1000000000000000000\n", "train.epochs=1000000000000000000 is out of range"),
    "width 10**12": ("model:\n  width: 1000000000000\n", "model.width=1000000000000 is out of range: need 1 <= width"),
    "input side 10**9": ("data:\n  eval_size: 1000000000\n", "data.eval_size=1000000000 is out of range"),
    "NaN": ("optim:\n  lr: .nan\n", "optim.lr: nan is not a finite number"),
    "infinity": ("schedule:\n  warmup_epochs: .inf\n", "schedule.warmup_epochs: inf is not a finite number"),
    "infinity as text": ("optim:\n  lr: '1e999'\n", "optim.lr: inf is not a finite number"),
    "seed of 27 digits": ("train:\n  seed: 100000000000000000000000000\n", "train.seed: 1000000000000000000000000"
                          "00 is too large"),
    "three crop scales": ("data:\n  crop_scale: [0.1, 0.5, 1]\n", r"data.crop_scale=\[0.1, 0.5, 1.0\]: give two"),
    "crop scales of text": ("data:\n  crop_scale: [a, b]\n", r"data.crop_scale=\['a', 'b'\]: give numbers"),
    "a knot of text": ("train:\n  total_steps: 10\n  schedule_knots: [x]\n",
                       r"train.schedule_knots: expected \[\[step"),
    "3000 nested lists": ("train:\n  total_steps: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "a section that is a number": ("1: {}\n", "unknown section 1"),
    "a password in a URL": ("train:\n  spot_metadata_url: http://admin:hunter2@169.254.169.254\n",
                            r"train.spot_metadata_url: the URL http://...@169.254.169.254 holds credentials"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RECIPES))
def test_wrong_types_huge_values_and_credentials_in_a_recipe_are_one_line(tmp_path, case):
    text, said = HOSTILE_RECIPES[case]
    with pytest.raises(ConfigError, match=said) as refused:
        load_config(_recipe(tmp_path, text))
    assert "\n" not in str(refused.value) and "hunter2" not in str(refused.value)


# --- checkpoints and exports from strangers ----------------------------------------------------------------

def _checkpoint(path: Path, change=None) -> Path:
    """A valid checkpoint of an untrained ResNet-18 of width 8 for 3 classes, as `change(state)` alters it."""
    cfg = Config()
    cfg.model.name, cfg.model.width, cfg.model.channels_last, cfg.data.eval_size = "resnet18", 8, False, 32
    state = {"config": cfg.to_dict(), "classes": ["c0", "c1", "c2"],
             "model": build_model("resnet18", 3, 8).state_dict()}
    if change is not None:
        state = change(copy.deepcopy(state))
    torch.save(state, path)
    return path


def test_every_torch_load_is_weights_only():
    """Not a risk, pinned down: every torch.load in the package refuses pickled code."""
    calls = [(file, line) for file in (REPO / "src").rglob("*.py")
             for line in file.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


def _compressed(path: Path) -> Path:
    """`path`, a torch.save zip, with its records deflated: a 50 MB tensor of zeros becomes a 50 kB file."""
    with zipfile.ZipFile(path) as original:
        records = [(info.filename, original.read(info)) for info in original.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for name, data in records:
            out.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def test_a_checkpoint_whose_records_are_compressed_is_refused_unread(tmp_path):
    """torch.load inflates a compressed record into memory whatever it declares: a 1 MB file took 1 GB."""
    from imagenet_resnet.serving.inference import load_model

    bomb = _compressed(_checkpoint(tmp_path / "bomb.pt", lambda s: {**s, "padding": torch.zeros(12_500_000)}))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UserError, match="holds compressed records, which torch.save never writes"):
        load_model(bomb, "cpu")
    weights = tmp_path / "weights.pt"
    torch.save({"padding": torch.zeros(12_500_000), **build_model("resnet18", 3, 8).state_dict()}, weights)
    with pytest.raises(UserError, match="holds compressed records"):
        load_weights(build_model("resnet18", 3, 8), str(_compressed(weights)))


def _set(section: str, key: str, value):
    def change(state):
        state["config"][section][key] = value
        return state
    return change


HOSTILE_CHECKPOINTS = {
    "a width its weights do not have": (_set("model", "width", 200),
                                        r"its weights are not those of the model its settings describe \(resnet18 "
                                        r"\(width 200\), 3 classes\): conv1.weight is \[8, 3, 7, 7\] there"),
    "an absurd input side": (_set("data", "eval_size", 10**9), "data.eval_size=1000000000 is out of range"),
    "more classes than weights": (lambda s: {**s, "classes": s["classes"] + ["c3"]}, r"fc.weight is \[3, 64\] there"),
    "no config": (lambda s: {k: v for k, v in s.items() if k != "config"}, "holds no training config"),
    "a list": (lambda s: [1, 2], "holds no training config"),
    "classes that are a number": (lambda s: {**s, "classes": 5}, "its classes are not a list of names"),
    "weights that are not tensors": (lambda s: {**s, "model": {"x": 1}}, "1 entries are not named tensors"),
    "figures that are text": (lambda s: {**s, "metrics": {"val_top1": "x", "val_images": "y"}, "saved_at": "z"}, None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CHECKPOINTS))
def test_a_hostile_checkpoint_is_one_line_before_anything_is_built(tmp_path, case):
    from imagenet_resnet.serving.inference import load_model
    from imagenet_resnet.serving.serve import model_card_markdown

    change, said = HOSTILE_CHECKPOINTS[case]
    path = _checkpoint(tmp_path / "hostile.pt", change)
    if said is None:  # loads, and its card still shows
        assert "top-1 not recorded" in model_card_markdown(load_model(path, "cpu"))
        return
    with pytest.raises(UserError, match=said) as refused:
        load_model(path, "cpu")
    assert "\n" not in str(refused.value) and str(refused.value).startswith(str(path))


def test_init_from_refuses_what_is_not_weights_of_the_model_in_one_line(tmp_path):
    model = build_model("resnet18", 3, 8)
    for state, said in (([1, 2], "holds a list, not a state dict"),
                        ({**model.state_dict(), "conv1.weight": torch.zeros(4, 3, 7, 7)},
                         r"conv1.weight is \[4, 3, 7, 7\] there, \[8, 3, 7, 7\] in the model")):
        torch.save(state, tmp_path / "w.pt")
        with pytest.raises(UserError, match=said):
            load_weights(model, str(tmp_path / "w.pt"))


def test_class_names_and_card_text_from_a_checkpoint_are_shown_as_text(tmp_path):
    """The page and the Space's README showed a checkpoint's class names as Markdown: a name could be a link, an
    image fetched from anywhere, or HTML (Gradio's sanitiser keeps links and images)."""
    from imagenet_resnet.serving.inference import load_model
    from imagenet_resnet.serving.serve import model_card_markdown

    names = ["<img src=https://evil.example/x.png onerror=alert(1)>", "[verify your account](https://evil.example)",
             "**bold** `code`"]
    path = _checkpoint(tmp_path / "names.pt", lambda s: {**s, "class_names": names})
    markdown = pytest.importorskip("markdown_it")  # (Gradio's Markdown renderer, CommonMark's rules)
    classes = next(line for line in model_card_markdown(load_model(path, "cpu")).splitlines() if "classes" in line)
    shown = markdown.MarkdownIt("commonmark", {"html": True}).render(classes)
    assert re.findall(r"<(\w+)", shown) == ["ul", "li", "strong"] and "https://" not in classes  # no link, image, code
    assert "&lt;img src=https://evil.example/x.png onerror=alert(1)&gt;" in shown  # shown, as text


def test_an_exports_card_cannot_name_a_file_outside_the_run_folder(tmp_path):
    """`evaluate` keeps its report in RUN/evaluations/, named after the card's `weights`: an export's sidecar
    says what that is."""
    from imagenet_resnet.evaluation.command import save_in_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text("")
    report = {"checkpoint": str(run / "model.safetensors"), "data": str(tmp_path / "val"),
              "weights": "x/../../../../escaped", "flip": False, "size": 32}
    saved = save_in_run(report)
    assert saved is not None and saved.parent == run / "evaluations"


# --- secrets ----------------------------------------------------------------------------------------------------

def test_an_mlflow_uri_with_credentials_in_the_environment_is_refused(monkeypatch):
    """--track mlflow:URI with user:password@ was refused, MLFLOW_TRACKING_URI with them was not: they went to
    train.log (in the tracker's error) and RUN/tracking.json."""
    pytest.importorskip("mlflow")
    from imagenet_resnet.training.tracking import TrackRequest, TrackSpec, check_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cr3tpw@127.0.0.1:9/")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI: the URL holds credentials") as refused:
        check_tracking(TrackRequest([TrackSpec("mlflow")]))
    assert "s3cr3tpw" not in str(refused.value) and "MLFLOW_TRACKING_PASSWORD" in str(refused.value)


def test_train_log_and_error_lines_never_hold_a_secret(tmp_path, monkeypatch):
    """The one writer of train.log, and the one printer of expected errors, blank the environment's credentials and
    a URL's user:password@ (a tracker's or a store's error may quote either)."""
    from imagenet_resnet.cli import one_line
    from imagenet_resnet.training.run_folder import RunFolder
    from imagenet_resnet.training.trainer import RunLog

    monkeypatch.setenv("WANDB_API_KEY", "wandbkey0123456789")
    message = "tracking: no answer from http://bob:pa55w0rd@mlflow.example (key wandbkey0123456789)"
    folder = RunFolder(tmp_path)
    folder.accept()  # a run that passed its checks: its log is written
    RunLog(folder)(message)
    for said in ((tmp_path / "train.log").read_text(), one_line(UserError(message + "\n\x1b[2J"))):
        assert "pa55w0rd" not in said and "wandbkey0123456789" not in said and "\x1b" not in said
        assert "http://***@mlflow.example" in said


# --- the Space folder -------------------------------------------------------------------------------------------

def test_the_space_holds_the_package_model_and_card_and_nothing_else(tmp_path, monkeypatch):
    """The Space copied the package's whole folder: in a checkout, anything lying there (a token, notes, a
    checkpoint) would be published with it."""
    pytest.importorskip("gradio")
    pytest.importorskip("safetensors")
    from imagenet_resnet.serving import space
    from imagenet_resnet.serving.inference import load_model

    package = tmp_path / "imagenet_resnet"
    shutil.copytree(space.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    strays = {".env": "HF_TOKEN=hf_secret0123", "notes.txt": "private", "data/best.pt": "weights",
              "serving/.hf_token": "hf_secret0123"}
    for name, text in strays.items():
        (package / name).write_text(text)
    monkeypatch.setattr(space, "PACKAGE_DIR", package)
    monkeypatch.setenv("HF_TOKEN", "hf_secret0123")
    out = tmp_path / "space"
    space.write_space(load_model(_checkpoint(tmp_path / "best.pt"), "cpu"), out)
    shipped = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not {f"imagenet_resnet/{name}" for name in strays} & shipped
    assert {"app.py", "README.md", "model.safetensors", "model.json", "imagenet_resnet/cli.py",
            "imagenet_resnet/data/imagenet_classes.tsv"} <= shipped
    assert not any(b"hf_secret0123" in (out / name).read_bytes() for name in shipped)
    assert not any(str(Path.home()).encode() in (out / name).read_bytes() for name in shipped
                   if not name.startswith("imagenet_resnet/"))


# --- serve under hostile clients ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """`serve` with room for two requests at once (one working, one queued), in a process group of its own."""
    pytest.importorskip("gradio")
    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    process, url = start_server([sys.executable, "-m", "imagenet_resnet", "serve", "--checkpoint",
                                 str(_checkpoint(folder / "best.pt")), "--port", str(port), "--device", "cpu",
                                 "--concurrency", "1", "--max-queue", "1"], port, folder / "serve.log",
                                new_session=True)
    yield url, port
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _stalled_upload(port: int) -> socket.socket:
    """A request whose body never comes: two bytes of the thousand it announces."""
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
    return client


def test_slow_uploads_cannot_hold_the_queue(small_server):
    """Two clients that never finish their body held both places of the queue for good: every other caller was
    told the server is busy, for as long as they kept their connections open."""
    import httpx

    url, port = small_server
    stalled = [_stalled_upload(port) for _ in range(2)]
    try:
        time.sleep(0.5)
        assert httpx.post(f"{url}/api/classify", content=b"\xff\xd8", timeout=30).status_code == 503
        time.sleep(6)  # past UPLOAD_GRACE_SECONDS (5): both stalled requests were answered 408
        answer = httpx.post(f"{url}/api/classify", content=b"\xff\xd8", timeout=30)
        assert answer.status_code == 415, answer.text  # not busy: the bytes were read, and are no image
        for client in stalled:
            client.settimeout(5)
            assert client.recv(200).startswith(b"HTTP/1.1 408")
    finally:
        for client in stalled:
            client.close()


def test_malformed_requests_get_a_clear_4xx_never_a_server_error(small_server):
    """Not a risk, pinned down: a huge Content-Length is refused before any byte is read, slow headers hold a
    connection but not the server, and Gradio's upload route parses odd multipart bodies without a 5xx (a file
    name with ../ lands in its own cache folder, under its base name)."""
    import httpx

    url, port = small_server
    slow_headers = socket.create_connection(("127.0.0.1", port))
    slow_headers.sendall(b"GET /api/health HTTP/1.1\r\nHo")
    try:
        assert httpx.get(f"{url}/api/health", timeout=10).status_code == 200
        with socket.create_connection(("127.0.0.1", port)) as huge:
            huge.settimeout(10)
            huge.sendall(b"POST /api/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\n")
            assert huge.recv(100).startswith(b"HTTP/1.1 413")
    finally:
        slow_headers.close()
    part = 'Content-Disposition: form-data; name="files"; filename="{}"\r\n\r\n{}\r\n'
    bodies = {"no file": '--b\r\nContent-Disposition: form-data; name="x"\r\n\r\nhi\r\n--b--\r\n',
              "two files": f"--b\r\n{part.format('a.jpg', 'A')}--b\r\n{part.format('b.jpg', 'B')}--b--\r\n",
              "a wrong boundary": f"--z\r\n{part.format('a.jpg', 'A')}--z--\r\n",
              "no end": f"--b\r\n{part.format('a.jpg', 'A')}",
              "a name with ../": f"--b\r\n{part.format('../../../../tmp/escaped.txt', 'A')}--b--\r\n"}
    for what, body in bodies.items():
        for path in ("/api/classify", "/gradio_api/upload"):
            answer = httpx.post(url + path, content=body.encode(), timeout=30,
                                headers={"content-type": "multipart/form-data; boundary=b"})
            assert answer.status_code < 500, (what, path, answer.text)
            uploaded = path.startswith("/gradio") and answer.status_code == 200
            stored = [Path(p) for p in answer.json()] if uploaded else []
            assert all(".." not in p.parts and p.name in ("a.jpg", "b.jpg", "escaped.txt") for p in stored), stored
    assert not Path("/tmp/escaped.txt").exists()


def test_a_parquet_shard_declaring_millions_of_rows_is_refused_unread(tmp_path):
    """A few kilobytes of run-length encoded labels declare millions of rows, each an index entry in memory."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = 2_000_001
    images = pa.array([None] * rows, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    (tmp_path / "source").mkdir()
    shard = tmp_path / "source" / "validation-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": images, "label": pa.array([0] * rows, pa.int64())}), shard)
    assert shard.stat().st_size < 1 << 20
    with pytest.raises(SourceError, match="declares 2,000,001 rows, more than ImageNet-1k's whole train split"):
        open_source(tmp_path / "source", val_only=True)
