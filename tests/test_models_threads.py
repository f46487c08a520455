"""A small model on CPU trains and evaluates on one torch thread unless OMP_NUM_THREADS says otherwise."""
from __future__ import annotations

import torch

from posttrain.models import SMALL_MODEL_PARAMS, fit_cpu_threads, folder_params


def test_small_model_gets_one_thread_unless_the_user_set_omp(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert not fit_cpu_threads(1000) and torch.get_num_threads() == 2  # the user's choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert not fit_cpu_threads(SMALL_MODEL_PARAMS) and torch.get_num_threads() == 2  # a real model: all
        assert fit_cpu_threads(1000) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_folder_params_counts_safetensors_bytes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 400)
    (tmp_path / "other.safetensors").write_bytes(b"\0" * 40)
    assert folder_params(str(tmp_path)) == 110
    assert folder_params(str(tmp_path / "missing")) == SMALL_MODEL_PARAMS  # unknown: treated as large
    assert folder_params("Qwen/Qwen2.5-0.5B") == SMALL_MODEL_PARAMS
