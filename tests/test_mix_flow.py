"""The Prefect flow `mix` wraps the same steps and gives the same mix as build.run."""
import json
import os

import pytest

from pipelines.mix import build, recipe
from pipelines.synth import mix as synth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_mix_flow_matches_the_direct_build(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "false")
    from prefect.server.api.server import SubprocessASGIServer

    from flows.mix import mix
    paths = synth.write_sources(str(tmp_path / "src"), scale=0.0005, seed=1)
    rpath = os.path.join(ROOT, "configs", "mix", "bunny-695k.yaml")
    try:
        stats = mix(recipe_path=rpath, output=str(tmp_path / "flow"), data_root=paths["root"],
                    export_llava_path=str(tmp_path / "flow" / "llava.json"))
    finally:
        # stop the temporary server while pytest's output is still open (else its
        # shutdown message is logged to a closed stream at exit)
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    direct = build.run(recipe.load(rpath, data_root=paths["root"]), str(tmp_path / "direct"))
    c = synth.counts(0.0005)
    assert stats["kept"] == direct["kept"] == c["image"] + c["wizardlm"]
    assert stats["sources"] == direct["sources"] and stats["exported"] == stats["kept"]
    a = open(tmp_path / "flow" / "mix.parquet", "rb").read()
    assert a == open(tmp_path / "direct" / "mix.parquet", "rb").read()


@pytest.mark.slow
def test_mix_prefect_does_not_log_every_http_request(tmp_path):
    # `warren mix --prefect` used to print one httpx line per API call; they come back with -v
    import subprocess
    import sys
    synth.write_sources(str(tmp_path / "src"), scale=0.0003, seed=2)
    recipe_path = synth.write_recipe(str(tmp_path / "src"), "bunny-695k")
    env = {**os.environ, "PYTHONPATH": ROOT, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run([sys.executable, "-m", "flows.cli", "mix", "--recipe", recipe_path, "--output",
                        str(tmp_path / "out"), "--prefect", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "HTTP Request" not in p.stderr and "Traceback" not in p.stderr
    assert "Finished in state" not in p.stderr    # Prefect's run chatter goes to its API, not the console
    c = synth.counts(0.0003)
    assert json.loads(p.stdout.strip().splitlines()[-1])["kept"] == c["image"] + c["wizardlm"]
