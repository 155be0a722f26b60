"""Real self-hosted inference servers for the suite, nobody here wrote them: they find what fakes cannot.

- `write_tiny_model` writes a random-weight llama-architecture GGUF of well under a megabyte with the `gguf`
  package: a small SentencePiece vocabulary in its metadata, so the servers tokenize and detokenize real text.
  Nothing is downloaded. Its weights are random, but shaped so generation never emits the end-of-sequence,
  control or byte tokens (a fixed positive dimension of the residual stream meets a large negative weight in
  their output rows): a reply runs to exactly its token cap, in clean text, one token per stream chunk.
- `LlamaCppPythonServer`: `python -m llama_cpp.server` (llama-cpp-python, a FastAPI app around llama.cpp).
- `LlamaServer`: llama.cpp's own C++ `llama-server`, as the `xllamacpp` wheel ships it prebuilt.

Each server runs as a subprocess on a free loopback port, is waited for (GET /v1/models, with a deadline) and
stopped at the end. Both are optional extras (`pip install -e '.[selfhosted]'`, which `make install-dev`
installs): a test that needs one that is missing fails rather than skips, since CI installs both.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "and", "blue", "red", "sky", "sun", "moon",
         "tree", "big", "small", "runs", "jumps", "over", "under", "quick", "slow", "green", "house", "river", "road",
         "light", "dark", "song", "bird", "fish", "stone", "cloud", "rain", "snow", "fire", "wind", "star")
N_EMBD, N_HEAD, N_FF, N_LAYERS, N_CTX = 64, 4, 128, 2, 512
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_tiny_model(path: Path, seed: int = 7, *, pooled: bool = False) -> Path:
    """A random-weight llama GGUF with a small built-in vocabulary; returns `path`. `pooled`: it declares mean
    pooling, as embedding models do (without it the servers return one vector per token, not per input)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = [f"\u2581{w}" for w in WORDS] + [*WORDS, *"abcdefghijklmnopqrstuvwxyz", "\u2581", ",", ".", "!", "?",
                                             ":", "|", "<", ">", "\n"]
    first_text = len(tokens)
    tokens += [p.encode() for p in dict.fromkeys(pieces)]
    types += [gguf.TokenType.NORMAL] * (len(tokens) - first_text)
    scores = [0.0] * first_text + [-float(i) for i in range(len(tokens) - first_text)]
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("switchboard-tiny-random")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    if pooled:
        writer.add_pooling_type(gguf.PoolingType.MEAN)

    def weights(*shape: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embeddings = weights(vocab, N_EMBD)
    embeddings[:, 0] = 4.0  # dimension 0 stays positive through every layer (nothing below writes to it)
    writer.add_tensor("token_embd.weight", embeddings)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = weights(vocab, N_EMBD, scale=1.0)
    output[:, 0] = 0.0
    output[:first_text, 0] = -100.0  # never generate </s>, control or byte tokens
    writer.add_tensor("output.weight", output)
    for layer in range(N_LAYERS):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            writer.add_tensor(prefix + name + ".weight", weights(N_EMBD, N_EMBD))
        attn_out = weights(N_EMBD, N_EMBD)
        attn_out[0, :] = 0.0
        writer.add_tensor(prefix + "attn_output.weight", attn_out)
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", weights(N_FF, N_EMBD))
        writer.add_tensor(prefix + "ffn_up.weight", weights(N_FF, N_EMBD))
        down = weights(N_EMBD, N_FF)
        down[0, :] = 0.0
        writer.add_tensor(prefix + "ffn_down.weight", down)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    name: str
    base_url: str  # with /v1
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _wait_until_serving(server: RunningServer, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n"
                               f"{server.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/models", timeout=2).status_code == 200:
                return
        time.sleep(0.1)  # polling a subprocess's port: there is no condition to wait on
    server.stop()
    raise RuntimeError(f"{server.name} did not answer within {deadline_s}s:\n{server.log.read_text()[-3000:]}")


@contextlib.contextmanager
def _serving(name: str, command: list[str], port: int, log: Path) -> Iterator[RunningServer]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(name, f"http://127.0.0.1:{port}/v1", process, log)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        server.stop()


def llama_cpp_python(model: Path, workdir: Path, *, n_ctx: int = N_CTX, embedding: bool = False
                     ) -> contextlib.AbstractContextManager[RunningServer]:
    """llama-cpp-python's OpenAI-compatible server on a free port; `embedding` serves /v1/embeddings too."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1", "--model_alias", "tiny",
               "--embedding", str(embedding).lower()]
    return _serving("llama-cpp-python", command, port, workdir / "llama-cpp-python.log")


_LLAMA_SERVER = """
import signal, sys, threading
import xllamacpp
params = xllamacpp.CommonParams()
params.model.path = sys.argv[1]
params.port = int(sys.argv[2])
params.hostnames = ["127.0.0.1"]
params.n_ctx = int(sys.argv[3])
params.n_parallel = 1
params.cpuparams.n_threads = 1
params.cpuparams_batch.n_threads = 1
params.model_alias = {"tiny"}
params.warmup = False
params.embedding = sys.argv[4] == "1"
server = xllamacpp.Server(params)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
"""


def llama_server(model: Path, workdir: Path, *, n_ctx: int = N_CTX, embedding: bool = False
                 ) -> contextlib.AbstractContextManager[RunningServer]:
    """llama.cpp's own `llama-server` (the xllamacpp wheel) on a free port; `embedding` makes it an embeddings
    server (it then refuses completions)."""
    port = free_port()
    command = [sys.executable, "-c", _LLAMA_SERVER, str(model), str(port), str(n_ctx), "1" if embedding else "0"]
    return _serving("llama-server", command, port, workdir / "llama-server.log")
