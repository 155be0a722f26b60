"""Hot reload the Kubernetes way: a ConfigMap volume's `..data` symlink swap reloads the policy."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import RunningGateway, key_hash, run_gateway, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.configmap_volume import ConfigMapVolume


def gamma_team(hash_of: str) -> str:
    return f"""
  gamma:
    keys: [{{id: gamma-key, hash: "{key_hash(hash_of)}"}}]
    models: [chat-model]
"""


@pytest.fixture
def volume(tmp_path: Path, upstream: FakeOpenAIUpstream) -> ConfigMapVolume:
    policy = standard_policy(upstream.base_url).replace("version: 1\n", "version: 1\nserver: {reload: "
                                                        "{poll_interval_s: 0.05}}\n", 1)
    return ConfigMapVolume(tmp_path / "config", {"policy.yaml": policy})


@pytest.fixture
def mounted(volume: ConfigMapVolume) -> Iterator[RunningGateway]:
    gateway = run_gateway(volume.path("policy.yaml"))
    yield gateway
    gateway.stop()


def fingerprint(gateway: RunningGateway) -> str:
    return httpx.get(gateway.base_url + "/readyz").json()["policy"]


def events(gateway: RunningGateway) -> tuple[threading.Event, threading.Event]:
    applied, refused = threading.Event(), threading.Event()
    gateway.store.on_change(lambda policy: applied.set())
    gateway.store.on_refusal(lambda error: refused.set())
    return applied, refused


def test_symlink_swap_reloads_the_policy(mounted: RunningGateway, volume: ConfigMapVolume) -> None:
    assert volume.path("policy.yaml").is_symlink()  # the gateway reads through kubelet's symlinks
    before = fingerprint(mounted)
    with pytest.raises(openai.AuthenticationError):
        mounted.client("sk-gamma").models.list()
    applied, _ = events(mounted)
    volume.update({"policy.yaml": volume.path("policy.yaml").read_text() + gamma_team("sk-gamma")})
    assert applied.wait(5), "the swapped ConfigMap was not applied"
    reply = mounted.client("sk-gamma").chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "from the configmap"}])
    assert reply.choices[0].message.content == "echo: from the configmap"
    assert fingerprint(mounted) != before


def test_bad_policy_pushed_by_a_swap_is_refused_and_the_old_one_serves(
        mounted: RunningGateway, volume: ConfigMapVolume) -> None:
    before = fingerprint(mounted)
    good = volume.path("policy.yaml").read_text()
    applied, refused = events(mounted)
    volume.update({"policy.yaml": "version: 1\nproviders: {}\n"})
    assert refused.wait(5), "the invalid ConfigMap was not noticed"
    assert not applied.is_set() and fingerprint(mounted) == before
    reply = mounted.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "ok"}])
    assert reply.choices[0].message.content == "echo: ok"
    # The next push, a valid one, applies: the refusal did not stop the watch.
    volume.update({"policy.yaml": good + gamma_team("sk-gamma")})
    assert applied.wait(5), "the corrected ConfigMap was not applied"
    assert mounted.client("sk-gamma").models.list().data


def test_swap_to_a_file_of_the_same_size_and_time_is_still_seen(
        mounted: RunningGateway, volume: ConfigMapVolume) -> None:
    current = volume.path("policy.yaml")
    old = os.stat(current)
    text = current.read_text()
    # Same length, same modification time: only the symlink's target tells the versions apart.
    swapped = text.replace("embed-model]", "chat-model] ", 1)
    assert len(swapped) == len(text) and swapped != text
    applied, _ = events(mounted)
    volume.update({"policy.yaml": swapped}, mtime_ns=old.st_mtime_ns)
    assert os.stat(current).st_size == old.st_size and os.stat(current).st_mtime_ns == old.st_mtime_ns
    assert applied.wait(5), "a same-size, same-time swap was missed"
    models = {m.id for m in mounted.client().models.list()}
    assert "embed-model" not in models
