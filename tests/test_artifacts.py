import json
import os
import time

import pytest

import catalog.store as store_module
from catalog.step import Step
from catalog.store import ArtifactError, ArtifactStore


def _step(tmp_path, monkeypatch=None):
    """A step module in a package of its own, importable from tmp_path."""
    package = tmp_path / f"demo_{tmp_path.name}"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "fake_step.py").write_text("VERSION = 1\n")
    import sys

    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))
    return Step("demo", f"{package.name}.fake_step", packages=(package.name,))


def _build(text):
    def build(out, inputs):
        (out / "data.txt").write_text(text)
        return {"rows": 1}

    return build


def test_produce_writes_data_and_manifest_last_and_reuses_intact(tmp_path):
    step = _step(tmp_path)
    ref, built = step.produce({"a": 1}, str(tmp_path / "root"), [], _build("hello"))
    assert built and ref.rows == 1
    manifest = json.loads((ref.path / "manifest.json").read_text())
    assert manifest["files"].keys() == {"data.txt"} and manifest["config"] == {"a": 1}
    again, built_again = step.produce({"a": 1}, str(tmp_path / "root"), [], _build("other"))
    assert not built_again and again == ref
    assert not any(p.name.startswith(".tmp-") for p in ref.path.parent.iterdir())


def test_key_changes_with_config_and_code(tmp_path):
    step = _step(tmp_path)
    first = step.key({"a": 1}, [])
    assert step.key({"a": 2}, []) != first
    (tmp_path / f"demo_{tmp_path.name}" / "fake_step.py").write_text("VERSION = 2\n")
    assert step.key({"a": 1}, []) != first


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_data", "delete_manifest"])
def test_damaged_artifact_is_never_read_and_is_rebuilt(tmp_path, damage):
    step = _step(tmp_path)
    root = str(tmp_path / "root")
    ref, _ = step.produce({}, root, [], _build("payload"))
    data = ref.path / "data.txt"
    if damage == "flip":
        data.write_text("paylOad")
    elif damage == "truncate":
        data.write_text("pay")
    elif damage == "delete_data":
        data.unlink()
    else:
        (ref.path / "manifest.json").unlink()
    store = ArtifactStore(root)
    assert store.manifest(ref.step, ref.key) is None
    with pytest.raises(ArtifactError, match="missing or corrupt"):
        store.open(ref)
    rebuilt, built = step.produce({}, root, [], _build("payload"))
    assert built and (rebuilt.path / "data.txt").read_text() == "payload"


def _build_settled(text):
    """A build whose file was last written an hour ago (as yesterday's parts linked into tonight's artifact are)."""
    def build(out, inputs):
        data = out / "data.txt"
        data.write_text(text)
        os.utime(data, ns=(time.time_ns() - 3600 * 10**9,) * 2)
        return {"rows": 1}

    return build


def test_settled_files_are_known_by_their_stat_and_any_change_is_still_caught(tmp_path, monkeypatch):
    step = _step(tmp_path)
    root = str(tmp_path / "root")
    ref, _ = step.produce({}, root, [], _build_settled("payload"))
    hashed = []
    monkeypatch.setattr(store_module, "sha256_file", lambda path: hashed.append(path) or "rehashed")
    store = ArtifactStore(root)
    assert store.manifest(ref.step, ref.key) is not None and hashed == []  # yesterday's gigabytes: not read again
    data = ref.path / "data.txt"
    data.write_text("paylOad")  # same size, written now: a new modification time
    assert store.manifest(ref.step, ref.key) is None and hashed == [data]


def test_a_settled_file_replaced_with_its_old_time_and_size_is_hashed_and_refused(tmp_path):
    step = _step(tmp_path)
    root = str(tmp_path / "root")
    ref, _ = step.produce({}, root, [], _build_settled("payload"))
    data = ref.path / "data.txt"
    old = data.stat()
    forged = tmp_path / "forged.txt"
    forged.write_text("paylOad")
    os.utime(forged, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(forged, data)  # same size and time, another inode
    assert ArtifactStore(root).manifest(ref.step, ref.key) is None


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    step = _step(tmp_path)

    def explode(out, inputs):
        (out / "data.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        step.produce({}, str(tmp_path / "root"), [], explode)
    leftovers = list((tmp_path / "root" / "demo").iterdir())
    assert leftovers == []


def test_temp_folders_of_dead_writers_on_this_host_are_swept_and_live_ones_kept(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from catalog.files import sweep_abandoned

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    folders = {name: tmp_path / name for name in (
        f".tmp-k1-aaaa0000-{dead.pid}@{host}", f".fetch-k2-bbbb0000-{dead.pid}@{host}",  # writer gone: swept
        f".tmp-k3-cccc0000-{os.getpid()}@{host}",  # this process, alive: kept
        f".tmp-k4-dddd0000-{dead.pid}@another-host",  # cannot tell from here: kept
        ".checkpoints-k5")}  # fine-tune checkpoints are for resuming: kept
    for folder in folders.values():
        folder.mkdir()
    removed = sweep_abandoned(tmp_path)
    assert sorted(p.name for p in removed) == sorted(list(folders)[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(list(folders)[2:])


def test_earlier_build_is_the_newest_intact_artifact_of_the_same_recipe_only(tmp_path):
    step = _step(tmp_path)
    root = str(tmp_path / "root")
    first, _ = step.produce({"a": 1}, root, [], _build("night 1"))
    second, _ = step.produce({"a": 1, "night": 2}, root, [], _build("night 2"))
    assert step.earlier({"a": 1}, root, []) == first.path  # same config and code: its rows may be reused
    assert step.earlier({"a": 2}, root, []) is None  # another config derives rows otherwise
    assert step.earlier({"a": 1, "night": 2}, root, []) == second.path
    (first.path / "data.txt").write_text("damaged")
    assert step.earlier({"a": 1}, root, []) is None  # reused rows are read: the artifact must verify
