"""Settings: flags over SEQSERVE_* environment over defaults; bad values named."""
import pytest

from serving.settings import Settings, from_args


def test_flags_override_environment_override_defaults():
    env = {"SEQSERVE_PORT": "6000", "SEQSERVE_SESSION_IDLE_S": "12.5", "SEQSERVE_MODELS": "a:2,b:3"}
    s = from_args(["--port", "7000"], env)
    assert s.port == 7000 and s.session_idle_s == 12.5 and s.pins() == {"a": 2, "b": 3}
    assert s.repo == Settings().repo and s.metrics_port == 8002


@pytest.mark.parametrize("argv,env,words", [
    (["--device", "tpu"], {}, "--device"),
    (["--max-sessions", "0"], {}, "--max-sessions"),
    ([], {"SEQSERVE_PORT": "eighty"}, "SEQSERVE_PORT"),
    (["--models", "lstm"], {}, "NAME:VERSION"),
])
def test_bad_settings_are_named(argv, env, words):
    with pytest.raises(ValueError) as e:
        from_args(argv, env)
    assert words in str(e.value)


def test_event_loop_choice():
    from serving import eventloop

    assert eventloop.resolve("asyncio") == "asyncio"
    assert eventloop.resolve("auto") == "uvloop"  # a core dependency on Linux
    assert eventloop.resolve("uvloop") == "uvloop"
    with pytest.raises(ValueError, match="--loop must be one of auto, uvloop, asyncio"):
        eventloop.resolve("trio")
    with pytest.raises(ValueError, match="--loop must be one of"):
        from_args(["--loop", "tokio"])

    async def which():
        import asyncio
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert eventloop.run(which(), "uvloop") == "uvloop"
    assert eventloop.run(which(), "asyncio") == "asyncio"


def test_gc_tuning_setting_and_effect():
    import subprocess
    import sys

    with pytest.raises(ValueError, match="--gc-gen0 must be 0"):
        from_args(["--gc-gen0", "-5"])
    assert from_args([]).gc_gen0 == 20_000 and from_args(["--gc-gen0", "0"]).gc_gen0 == 0
    # in a fresh interpreter: objects alive now are frozen, the young generation is larger
    code = ("import gc, logging; from serving.server import tune_gc; keep = [[i] for i in range(5000)]; "
            "tune_gc(12345); print(gc.get_threshold()[0], gc.get_freeze_count() >= 5000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["12345", "True"]
