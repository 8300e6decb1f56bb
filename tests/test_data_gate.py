"""The stage-start data check: remembered per tree by its manifest, done by one rank, the same answer on all."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from datakit import check, check_cache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def voc(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny VOC tree and an empty cache."""
    monkeypatch.setenv("DATA_CHECK_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_data / "VOCdevkit", tmp_path / "VOCdevkit"))


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The roots that datakit.check.check actually walked (a cached start walks none)."""
    calls: list[str] = []
    real = check.check

    def counted(kind, root, **kw):
        calls.append(str(root))
        return real(kind, root, **kw)

    monkeypatch.setattr(check, "check", counted)
    return calls


def _a_jpeg(voc: Path) -> Path:
    return sorted((voc / "VOC2007" / "JPEGImages").glob("*.jpg"))[0]


def test_unchanged_tree_is_checked_once_and_a_changed_one_again(voc: Path, checks: list[str]) -> None:
    first = check_cache.check_once("voc", voc)
    assert (first.problems, first.cached, len(checks)) == ([], False, 1) and "remembered in" in first.note
    again = check_cache.check_once("voc", voc)
    assert (again.problems, again.cached, again.files, len(checks)) == ([], True, first.files, 1)
    assert "unchanged" in again.note

    jpeg = _a_jpeg(voc)
    st = jpeg.stat()
    os.utime(jpeg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # modification time only
    assert not check_cache.check_once("voc", voc).cached and len(checks) == 2
    assert check_cache.check_once("voc", voc).cached and len(checks) == 2

    xml = sorted((voc / "VOC2012" / "Annotations").glob("*.xml"))[0]
    xml.write_text(xml.read_text() + "\n")  # size only (still valid XML)
    assert not check_cache.check_once("voc", voc).cached and len(checks) == 3

    # Same size, mtime set back (cp -p, rsync -a): the ctime still changes.
    st = jpeg.stat()
    jpeg.write_bytes(jpeg.read_bytes())
    os.utime(jpeg, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not check_cache.check_once("voc", voc).cached and len(checks) == 4

    (voc / "VOC2007" / "JPEGImages" / "extra.jpg").write_bytes(jpeg.read_bytes())  # a new name
    assert not check_cache.check_once("voc", voc).cached and len(checks) == 5
    assert check_cache.check_once("voc", voc).cached and len(checks) == 5


def test_a_changed_checker_checks_again(voc: Path, checks: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    check_cache.check_once("voc", voc)
    monkeypatch.setattr(check_cache, "checker_digest", lambda: "another checker")
    assert not check_cache.check_once("voc", voc).cached and len(checks) == 2


def test_a_broken_file_stops_the_run_with_its_name_and_is_not_remembered(voc: Path, checks: list[str]) -> None:
    assert check_cache.check_once("voc", voc).problems == []
    jpeg = _a_jpeg(voc)
    jpeg.write_bytes(b"not a jpeg")
    for _ in range(2):  # a failing tree is checked at every start until it is fixed
        (line,) = check_cache.check_once("voc", voc).problems
        assert line.startswith(f"{jpeg}: not a readable image")
    assert len(checks) == 3


def test_a_failed_full_check_forgets_the_earlier_pass(voc: Path) -> None:
    from datakit import check_cli

    jpeg = _a_jpeg(voc)
    data = jpeg.read_bytes()  # damaged inside (a bad sector, a flipped block): its header and its end still read
    jpeg.write_bytes(data[:len(data) // 2] + b"\xff" * 64 + data[len(data) // 2 + 64:])
    assert check_cache.check_once("voc", voc).problems == []  # headers: passed, and remembered
    assert check_cache.check_once("voc", voc).cached
    assert check_cli.main(["voc", str(voc), "--full", "--jobs", "1"]) == 1
    again = check_cache.check_once("voc", voc)  # the unchanged tree: the pass above must not be reused
    assert not again.cached and again.problems == []
    # A check of headers cannot see the damage: it is --full's, every time until the file is replaced.
    (line,) = check.check("voc", voc, full=True).problems
    assert line.startswith(f"{jpeg}: image cannot be decoded")


def test_a_truncated_image_is_found_at_the_stage_start(voc: Path) -> None:
    """A truncated download (the commonest damage) lacks its end marker: the stage-start check of headers decodes
    that file and stops the stage with --full's line, where it used to pass it to a training that read it."""
    jpeg = _a_jpeg(voc)
    jpeg.write_bytes(jpeg.read_bytes()[:-2000])
    (line,) = check_cache.check_once("voc", voc).problems
    assert line == check.check("voc", voc, full=True).problems[0] and "truncated" in line


def test_cache_off_or_unwritable_checks_every_time_and_the_run_goes_on(voc: Path, checks: list[str], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_CHECK_CACHE", "off")
    assert [check_cache.check_once("voc", voc).cached for _ in range(2)] == [False, False]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DATA_CHECK_CACHE", str(blocker / "cache"))  # a folder cannot be made there
    outcome = check_cache.check_once("voc", voc)
    assert outcome.problems == [] and "could not be remembered" in outcome.note
    assert len(checks) == 3


def test_manifest_walk_ends_on_a_folder_link_loop(voc: Path) -> None:
    before = check_cache.Manifest.of(voc)
    (voc / "VOC2007" / "loop").symlink_to(voc, target_is_directory=True)
    after = check_cache.Manifest.of(voc)
    assert after.digest != before.digest and after.entries > before.entries
    assert check_cache.Manifest.of(voc / "missing").digest != before.digest


RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from datakit import check
from transfer.data_gate import check_data_once

calls = []
real = check.check
check.check = lambda *a, **kw: calls.append(1) or real(*a, **kw)
results = []
for root in sys.argv[1:]:  # the good tree twice (the second start is remembered), then the broken one
    results.append(check_data_once("voc", root, launcher="pytorch", dist_cfg=dict(backend="gloo")))
    results.append(len(calls))
out = os.path.join(os.environ["OUT_DIR"], "rank%s.json" % dist.get_rank())
with open(out, "w") as f:
    json.dump(dict(world=dist.get_world_size(), results=results), f)
dist.barrier()  # both files are written before either rank exits
sys.exit(1 if results[-2] else 0)  # a problem stops every rank, as in transfer/runner.py
"""


def torchrun_case(voc: Path, tmp_path: Path, script_text: str) -> tuple[Path, Path, Path, Path, dict]:
    """A broken copy of the tree (one XML cut short), the ranks' script, the folder they write their answers to, and
    their environment: (broken root, its broken XML, script, out dir, env)."""
    broken = Path(shutil.copytree(voc, tmp_path / "broken"))
    xml = sorted((broken / "VOC2007" / "Annotations").glob("*.xml"))[0]
    xml.write_text("<annotation><object>")
    script = tmp_path / "ranks.py"
    script.write_text(script_text.format(repo=str(REPO)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return broken, xml, script, out_dir, dict(os.environ, OUT_DIR=str(out_dir), CUDA_VISIBLE_DEVICES="",
                                              OMP_NUM_THREADS="1")


def test_under_torchrun_one_rank_checks_and_every_rank_stops_on_a_problem(voc: Path, tmp_path: Path) -> None:
    broken, xml, script, out_dir, env = torchrun_case(voc, tmp_path, RANK_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(voc), str(voc), str(broken)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    (ok0, n0, cached0, m0, bad0, k0), (ok1, n1, cached1, m1, bad1, k1) = (r["results"] for r in ranks)
    assert ok0 == ok1 == cached0 == cached1 == []
    assert (n0, m0, k0) == (1, 1, 2)  # rank 0: checked the good tree, skipped it the second time, checked the broken
    assert (n1, m1, k1) == (0, 0, 0)  # rank 1 never checked
    assert bad0 == bad1 and len(bad0) == 1 and bad0[0].startswith(f"{xml}: invalid XML")
    assert "unchanged" in proc.stdout and proc.stdout.count("data check:") == 3  # rank 0's notes only


NODE_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from transfer.data_gate import check_data_once

problems = check_data_once("voc", sys.argv[1], launcher="pytorch", dist_cfg=dict(backend="gloo"))
out = os.path.join(os.environ["OUT_DIR"], "rank%s.json" % dist.get_rank())
with open(out, "w") as f:
    json.dump(dict(node=os.environ["GROUP_RANK"], root=sys.argv[1], problems=problems), f)
dist.barrier()
"""


def test_each_node_checks_its_own_copy_and_every_rank_hears_of_a_broken_one(voc: Path, tmp_path: Path) -> None:
    """Two torchrun agents (nodes) of one process each, the data 'staged' to each node under its own path: the
    second node's copy is broken. Both ranks get its line, named by that node; before, the first node's check
    answered for both and the broken copy passed."""
    broken, xml, script, out_dir, env = torchrun_case(voc, tmp_path, NODE_SCRIPT)
    with socket.socket() as s:  # a free port for the rendezvous store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                f"--rdzv-conf=is_host={int(root == voc)}", str(script), str(root)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for root in (voc, broken)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    (node,) = {r["node"] for r in ranks if r["root"] == str(broken)}
    assert len(ranks) == 2 and all(r["problems"] == ranks[0]["problems"] for r in ranks)
    (line,) = ranks[0]["problems"]
    assert line.startswith(f"node {node} (") and f"): {xml}: invalid XML" in line
    assert sum(out.count("data check:") for out in outputs) == 2  # each node's own check
