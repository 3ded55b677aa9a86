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
