"""Which GPTQ layers vLLM runs through its Marlin kernel: vLLM's rules, hand-worked shapes."""

from __future__ import annotations

from compress.kernels import marlin_problems, vllm_linears

SMOL = {"model.layers.0.self_attn.qkv_proj": (960, 576), "model.layers.0.self_attn.o_proj": (576, 576),
        "model.layers.0.mlp.gate_up_proj": (3072, 576), "model.layers.0.mlp.down_proj": (576, 1536)}


def test_vllm_fuses_qkv_and_gate_up_like_its_llama():
    hf = {"m.0.self_attn.q_proj": (576, 576), "m.0.self_attn.k_proj": (192, 576),
          "m.0.self_attn.v_proj": (192, 576), "m.0.self_attn.o_proj": (576, 576),
          "m.0.mlp.gate_proj": (1536, 576), "m.0.mlp.up_proj": (1536, 576), "m.0.mlp.down_proj": (576, 1536)}
    assert vllm_linears(hf) == {"m.0.self_attn.qkv_proj": (960, 576), "m.0.self_attn.o_proj": (576, 576),
                                "m.0.mlp.gate_up_proj": (3072, 576), "m.0.mlp.down_proj": (576, 1536)}
    assert vllm_linears({"m.0.attn.q_proj": (64, 64), "m.0.attn.k_proj": (32, 48)}) == \
        {"m.0.attn.q_proj": (64, 64), "m.0.attn.k_proj": (32, 48)}  # different inputs: not fused


def test_without_act_order_vllm_pads_tiles_and_only_groups_must_divide():
    assert marlin_problems(SMOL, bits=4, group_size=64, desc_act=False, sym=True) == []
    assert marlin_problems({"down": (576, 1504)}, bits=4, group_size=64, desc_act=False, sym=True) == [
        "down (out 576, in 1504): in_features 1504 is not a multiple of group_size 64"]
    assert marlin_problems({"down": (576, 1504)}, bits=4, group_size=32, desc_act=False, sym=True) == []
    assert marlin_problems({"tiny": (64, 64)}, bits=8, group_size=128, desc_act=False, sym=True) == []  # one group


def test_act_order_keeps_the_strict_tile_check():
    assert marlin_problems(SMOL, bits=4, group_size=64, desc_act=True, sym=True) == [
        f"{name} (out {o}, in 576): in_features 576 is not a multiple of 128 (Marlin min_thread_k)"
        for name, (o, _) in SMOL.items() if name.endswith(("qkv_proj", "o_proj", "gate_up_proj"))]
    assert marlin_problems({"x": (96, 256)}, bits=4, group_size=128, desc_act=True, sym=True) == [
        "x (out 96, in 256): out_features 96 is not a multiple of 64 (Marlin min_thread_n)"]
    # one group per row: act-order changes nothing, and vLLM drops it
    assert marlin_problems(SMOL, bits=4, group_size=-1, desc_act=True, sym=True) == []


def test_older_vllm_without_tile_padding_rejects_misaligned_tiles():
    assert marlin_problems(SMOL, bits=4, group_size=64, desc_act=False, sym=True, tile_padding=False) == [
        f"{name} (out {o}, in 576): in_features 576 is not a multiple of 128 (Marlin min_thread_k)"
        for name, (o, _) in SMOL.items() if name.endswith(("qkv_proj", "o_proj", "gate_up_proj"))]


def test_bits_and_symmetry_outside_marlin_send_every_layer_to_the_fallback():
    assert marlin_problems(SMOL, bits=3, group_size=64, desc_act=False, sym=True) == [
        "all 4 layers: GPTQ Marlin takes 4- or 8-bit symmetric weights (got bits 3, sym True)"]
    assert marlin_problems(SMOL, bits=4, group_size=64, desc_act=False, sym=False) == [
        "all 4 layers: GPTQ Marlin takes 4- or 8-bit symmetric weights (got bits 4, sym False)"]
    assert marlin_problems(SMOL, bits=4, group_size=16, desc_act=False, sym=True) == [
        "all 4 layers: GPTQ Marlin takes group_size -1, 32, 64 or 128 (got 16)"]
