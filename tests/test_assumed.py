"""Each patch's assumptions about fastai's code are fingerprinted: the installed fastai matches them, and a
fastai whose assumed function differs by one byte is refused when the patch would apply, naming it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import fastai

from fastlaunch.rank.assumed import FINGERPRINTS, fingerprint, resolve
from fastlaunch.rank.integrate import PATCHES


def test_every_assumed_function_is_fingerprinted_and_matches_the_installed_fastai():
    import fastai.callback.all  # noqa: F401  (every module a patch assumes)

    assumed = {name for item in PATCHES for name in item.assumes}
    assert assumed == set(FINGERPRINTS)
    assert {name: fingerprint(resolve(name)) for name in assumed} == FINGERPRINTS
    assert "fastai.callback.core.Callback.__call__" in assumed and "fastai.learner.Learner.lr_find" in assumed


def test_a_fastai_whose_assumed_function_changed_by_one_byte_is_refused_naming_it(tmp_path):
    scratch = tmp_path / "site"
    shutil.copytree(Path(fastai.__file__).parent, scratch / "fastai")
    learner = scratch / "fastai" / "learner.py"
    source = learner.read_text()
    marker = "        if start_epoch != 0:"  # inside Learner.fit
    assert source.count(marker) == 1
    learner.write_text(source.replace(marker, "        if start_epoch != 0 :"))
    probe = textwrap.dedent("""
        from fastlaunch.env import DistEnv
        from fastlaunch.errors import UsageError
        from fastlaunch.rank import integrate
        from fastlaunch.rank.context import RankContext
        integrate.install(RankContext(DistEnv.from_environ({})))
        try:
            import fastai.learner
        except UsageError as exc:
            print(exc)
        else:
            print("installed")
    """)
    env = {"PYTHONPATH": str(scratch), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert line.startswith("fastlaunch: error: fastai's fastai.learner.Learner.fit is not the code"), line
    assert "fit_opens_a_fit_run" in line and "HINT:" in line
    # the unchanged copy installs
    learner.write_text(source)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert out.stdout.strip().splitlines()[-1] == "installed", out.stderr[-2000:]
