"""stacking.stack_linears on the real SmolLM2-135M (BF16 engines' fused q/k/v and gate/up):
same logits and greedy tokens as the unstacked model, state dict unchanged, one matmul per group."""
import torch

from arcquant.engine import Engine
from arcquant.stacking import StackedLinear, stack_linears


def test_stacked_linears_give_the_same_model(fresh_smollm, monkeypatch):
    model, tok = fresh_smollm
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits
        want_tokens = Engine(model, 1, ids.shape[1] + 9, graphs=False).generate(ids, 8)
    assert stack_linears(model) == 2 * model.config.num_hidden_layers
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, StackedLinear)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    state = model.state_dict()
    assert list(state) == list(before) and all(torch.equal(state[k], v) for k, v in before.items())
    x = torch.randn(1, 3, attn.q_proj.in_features)
    with torch.no_grad():
        stack = attn.q_proj._stack[0]
        yq = attn.q_proj(x)
        product = stack.product._value
        yk = attn.k_proj(x)
        assert stack.product._value is product                                  # the group's matmul ran once
        attn.v_proj(x)
        assert stack.product._value is None                                     # every member took it: let go
        pre = "model.layers.0.self_attn."
        torch.testing.assert_close(yq, x @ before[pre + "q_proj.weight"].t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(yk, x @ before[pre + "k_proj.weight"].t(), rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # traced: own rows, no cache
        torch.testing.assert_close(attn.k_proj(x), yk, rtol=1e-5, atol=1e-5)
        assert stack.product._value is None
        monkeypatch.undo()
        got = model(ids).logits
        got_tokens = Engine(model, 1, ids.shape[1] + 9, graphs=False).generate(ids, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)   # fp32 matmul over a wider N
    assert torch.equal(got_tokens, want_tokens)
