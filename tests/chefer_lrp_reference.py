"""Chefer, Gur & Wolf's "transformer_attribution" (CVPR 2021), the reference of
``tests/test_chefer_lrp.py``: a float64 transcription of their released code,
hila-chefer/Transformer-Explainability, run in PyTorch on a timm ``VisionTransformer``'s
state dict.

Transcribed, with their names and their order of operations:

- ``modules/layers_ours.py`` (commit d524286): ``safe_divide``, ``forward_hook``,
  ``RelProp``, ``RelPropSimple``, the identity rules of ``GELU``, ``Softmax``,
  ``LayerNorm`` and ``Dropout``, and ``Add``, ``einsum``, ``IndexSelect``, ``Clone`` and
  ``Linear`` (its alpha-beta rule; ``generate_LRP`` passes ``alpha=1``).
- ``baselines/ViT/ViT_LRP.py`` (commit f9cdd27): ``compute_rollout_attention`` (the one
  ``relprop`` calls: ``+ I``, no row normalisation), ``Mlp``, ``Attention`` (with its
  hooks: ``save_attn_gradients`` on the attention weights, ``save_attn_cam`` in its
  ``relprop``), ``Block``, ``PatchEmbed``, ``VisionTransformer.forward`` and the
  ``"transformer_attribution"`` branch of ``VisionTransformer.relprop``.
- ``baselines/ViT/ViT_explanation_generator.py`` (commit 7cf1edb): ``LRP.generate_LRP``
  (the target logit backpropagated for the attention gradients, then ``relprop`` from
  the one-hot vector of the target class).

Changes, none to a relevance rule: einops' ``rearrange`` is written as the
``reshape``/``permute`` it performs (einops is not a test dependency); ``.cuda()`` is
dropped; the one-hot vector is made in torch and in the output's float64 (theirs, numpy
float32, is promoted by the float64 weights anyway), and the rollout's identity in the
maps' dtype; ``qkv_bias=True`` (their ``vit_base_patch16_224``, and timm's default); the
final ``LayerNorm`` has timm's ``eps=1e-6`` where ``ViT_LRP.py`` leaves PyTorch's
default 1e-5, so that this is the network of the weights (``LayerNorm``'s rule is the
identity either way: only the forward values differ); ``relprop`` keeps the relevance
that reaches the first block's input as ``input_relevance``, for the conservation test.
Left out as unused here: ``Conv2d``'s rule and the ``relprop`` methods other than
``"transformer_attribution"`` (it does not reach the patch embedding), the input-gradient
hook and the weight initialisation (the weights are loaded). Their code explains one
image at a time (``generate_LRP`` builds a ``(1, classes)`` one-hot vector, and ``Add``'s
rescaling sums over the whole tensor), so ``LRP.generate_LRP`` here takes one image too.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------- modules/layers_ours.py


def safe_divide(a, b):
  den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
  den = den + den.eq(0).type(den.type()) * 1e-9
  return a / den * b.ne(0).type(b.type())


def forward_hook(self, input, output):
  if type(input[0]) in (list, tuple):
    self.X = []
    for i in input[0]:
      x = i.detach()
      x.requires_grad = True
      self.X.append(x)
  else:
    self.X = input[0].detach()
    self.X.requires_grad = True

  self.Y = output


class RelProp(nn.Module):
  def __init__(self):
    super().__init__()
    self.register_forward_hook(forward_hook)

  def gradprop(self, Z, X, S):
    C = torch.autograd.grad(Z, X, S, retain_graph=True)
    return C

  def relprop(self, R, alpha):
    return R


class RelPropSimple(RelProp):
  def relprop(self, R, alpha):
    Z = self.forward(self.X)
    S = safe_divide(R, Z)
    C = self.gradprop(Z, self.X, S)

    if not torch.is_tensor(self.X):
      outputs = []
      outputs.append(self.X[0] * C[0])
      outputs.append(self.X[1] * C[1])
    else:
      outputs = self.X * (C[0])
    return outputs


class GELU(nn.GELU, RelProp):
  pass


class Softmax(nn.Softmax, RelProp):
  pass


class LayerNorm(nn.LayerNorm, RelProp):
  pass


class Dropout(nn.Dropout, RelProp):
  pass


class Add(RelPropSimple):
  def forward(self, inputs):
    return torch.add(*inputs)

  def relprop(self, R, alpha):
    Z = self.forward(self.X)
    S = safe_divide(R, Z)
    C = self.gradprop(Z, self.X, S)

    a = self.X[0] * C[0]
    b = self.X[1] * C[1]

    a_sum = a.sum()
    b_sum = b.sum()

    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()

    a = a * safe_divide(a_fact, a.sum())
    b = b * safe_divide(b_fact, b.sum())

    outputs = [a, b]

    return outputs


class einsum(RelPropSimple):  # noqa: N801  (their name)
  def __init__(self, equation):
    super().__init__()
    self.equation = equation

  def forward(self, *operands):
    return torch.einsum(self.equation, *operands)


class IndexSelect(RelProp):
  def forward(self, inputs, dim, indices):
    self.__setattr__("dim", dim)
    self.__setattr__("indices", indices)

    return torch.index_select(inputs, dim, indices)

  def relprop(self, R, alpha):
    Z = self.forward(self.X, self.dim, self.indices)
    S = safe_divide(R, Z)
    C = self.gradprop(Z, self.X, S)

    if not torch.is_tensor(self.X):
      outputs = []
      outputs.append(self.X[0] * C[0])
      outputs.append(self.X[1] * C[1])
    else:
      outputs = self.X * (C[0])
    return outputs


class Clone(RelProp):
  def forward(self, input, num):
    self.__setattr__("num", num)
    outputs = []
    for _ in range(num):
      outputs.append(input)

    return outputs

  def relprop(self, R, alpha):
    Z = []
    for _ in range(self.num):
      Z.append(self.X)
    S = [safe_divide(r, z) for r, z in zip(R, Z, strict=True)]
    C = self.gradprop(Z, self.X, S)[0]

    R = self.X * C

    return R


class Linear(nn.Linear, RelProp):
  def relprop(self, R, alpha):
    beta = alpha - 1
    pw = torch.clamp(self.weight, min=0)
    nw = torch.clamp(self.weight, max=0)
    px = torch.clamp(self.X, min=0)
    nx = torch.clamp(self.X, max=0)

    def f(w1, w2, x1, x2):
      Z1 = F.linear(x1, w1)
      Z2 = F.linear(x2, w2)
      S1 = safe_divide(R, Z1 + Z2)
      S2 = safe_divide(R, Z1 + Z2)
      C1 = x1 * torch.autograd.grad(Z1, x1, S1)[0]
      C2 = x2 * torch.autograd.grad(Z2, x2, S2)[0]

      return C1 + C2

    activator_relevances = f(pw, nw, px, nx)
    inhibitor_relevances = f(nw, pw, px, nx)

    R = alpha * activator_relevances - beta * inhibitor_relevances

    return R


# -------------------------------------------------------------- baselines/ViT/ViT_LRP.py


def compute_rollout_attention(all_layer_matrices, start_layer=0):
  # adding residual consideration
  num_tokens = all_layer_matrices[0].shape[1]
  batch_size = all_layer_matrices[0].shape[0]
  eye = torch.eye(num_tokens, dtype=all_layer_matrices[0].dtype).expand(
      batch_size, num_tokens, num_tokens)
  all_layer_matrices = [all_layer_matrices[i] + eye for i in range(len(all_layer_matrices))]
  joint_attention = all_layer_matrices[start_layer]
  for i in range(start_layer + 1, len(all_layer_matrices)):
    joint_attention = all_layer_matrices[i].bmm(joint_attention)
  return joint_attention


class Mlp(nn.Module):
  def __init__(self, in_features, hidden_features=None, out_features=None, drop=0.0):
    super().__init__()
    out_features = out_features or in_features
    hidden_features = hidden_features or in_features
    self.fc1 = Linear(in_features, hidden_features)
    self.act = GELU()
    self.fc2 = Linear(hidden_features, out_features)
    self.drop = Dropout(drop)

  def forward(self, x):
    x = self.fc1(x)
    x = self.act(x)
    x = self.drop(x)
    x = self.fc2(x)
    x = self.drop(x)
    return x

  def relprop(self, cam, **kwargs):
    cam = self.drop.relprop(cam, **kwargs)
    cam = self.fc2.relprop(cam, **kwargs)
    cam = self.act.relprop(cam, **kwargs)
    cam = self.fc1.relprop(cam, **kwargs)
    return cam


class Attention(nn.Module):
  def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
    super().__init__()
    self.num_heads = num_heads
    head_dim = dim // num_heads
    self.scale = head_dim ** -0.5

    # A = Q*K^T
    self.matmul1 = einsum("bhid,bhjd->bhij")
    # attn = A*V
    self.matmul2 = einsum("bhij,bhjd->bhid")

    self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
    self.attn_drop = Dropout(attn_drop)
    self.proj = Linear(dim, dim)
    self.proj_drop = Dropout(proj_drop)
    self.softmax = Softmax(dim=-1)

    self.attn_cam = None
    self.attn = None
    self.v = None
    self.v_cam = None
    self.attn_gradients = None

  def get_attn(self):
    return self.attn

  def save_attn(self, attn):
    self.attn = attn

  def save_attn_cam(self, cam):
    self.attn_cam = cam

  def get_attn_cam(self):
    return self.attn_cam

  def save_v(self, v):
    self.v = v

  def save_v_cam(self, cam):
    self.v_cam = cam

  def save_attn_gradients(self, attn_gradients):
    self.attn_gradients = attn_gradients

  def get_attn_gradients(self):
    return self.attn_gradients

  def forward(self, x):
    b, n, _, h = *x.shape, self.num_heads
    qkv = self.qkv(x)
    # rearrange(qkv, 'b n (qkv h d) -> qkv b h n d', qkv=3, h=h)
    q, k, v = qkv.reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)

    self.save_v(v)

    dots = self.matmul1([q, k]) * self.scale

    attn = self.softmax(dots)
    attn = self.attn_drop(attn)

    self.save_attn(attn)
    attn.register_hook(self.save_attn_gradients)

    out = self.matmul2([attn, v])
    out = out.permute(0, 2, 1, 3).reshape(b, n, -1)  # rearrange 'b h n d -> b n (h d)'

    out = self.proj(out)
    out = self.proj_drop(out)
    return out

  def relprop(self, cam, **kwargs):
    cam = self.proj_drop.relprop(cam, **kwargs)
    cam = self.proj.relprop(cam, **kwargs)
    b, n, _ = cam.shape  # rearrange 'b n (h d) -> b h n d'
    cam = cam.reshape(b, n, self.num_heads, -1).permute(0, 2, 1, 3)

    # attn = A*V
    (cam1, cam_v) = self.matmul2.relprop(cam, **kwargs)
    cam1 /= 2
    cam_v /= 2

    self.save_v_cam(cam_v)
    self.save_attn_cam(cam1)

    cam1 = self.attn_drop.relprop(cam1, **kwargs)
    cam1 = self.softmax.relprop(cam1, **kwargs)

    # A = Q*K^T
    (cam_q, cam_k) = self.matmul1.relprop(cam1, **kwargs)
    cam_q /= 2
    cam_k /= 2

    # rearrange([cam_q, cam_k, cam_v], 'qkv b h n d -> b n (qkv h d)', qkv=3)
    cam_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(b, n, -1)

    return self.qkv.relprop(cam_qkv, **kwargs)


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0):
    super().__init__()
    self.norm1 = LayerNorm(dim, eps=1e-6)
    self.attn = Attention(
        dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
    self.norm2 = LayerNorm(dim, eps=1e-6)
    mlp_hidden_dim = int(dim * mlp_ratio)
    self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, drop=drop)

    self.add1 = Add()
    self.add2 = Add()
    self.clone1 = Clone()
    self.clone2 = Clone()

  def forward(self, x):
    x1, x2 = self.clone1(x, 2)
    x = self.add1([x1, self.attn(self.norm1(x2))])
    x1, x2 = self.clone2(x, 2)
    x = self.add2([x1, self.mlp(self.norm2(x2))])
    return x

  def relprop(self, cam, **kwargs):
    (cam1, cam2) = self.add2.relprop(cam, **kwargs)
    cam2 = self.mlp.relprop(cam2, **kwargs)
    cam2 = self.norm2.relprop(cam2, **kwargs)
    cam = self.clone2.relprop((cam1, cam2), **kwargs)

    (cam1, cam2) = self.add1.relprop(cam, **kwargs)
    cam2 = self.attn.relprop(cam2, **kwargs)
    cam2 = self.norm1.relprop(cam2, **kwargs)
    cam = self.clone1.relprop((cam1, cam2), **kwargs)
    return cam


class PatchEmbed(nn.Module):
  def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
               depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True):
    super().__init__()
    self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size,
                                  in_chans=in_chans, embed_dim=embed_dim)
    num_patches = (img_size // patch_size) ** 2
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.blocks = nn.ModuleList([
        Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        for _ in range(depth)])
    self.norm = LayerNorm(embed_dim, eps=1e-6)  # timm's eps (module docstring)
    self.head = Linear(embed_dim, num_classes)
    self.pool = IndexSelect()
    self.add = Add()

  def forward(self, x):
    B = x.shape[0]
    x = self.patch_embed(x)

    cls_tokens = self.cls_token.expand(B, -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = self.add([x, self.pos_embed])

    for blk in self.blocks:
      x = blk(x)

    x = self.norm(x)
    x = self.pool(x, dim=1, indices=torch.tensor(0, device=x.device))
    x = x.squeeze(1)
    x = self.head(x)
    return x

  def relprop(self, cam=None, method="transformer_attribution", is_ablation=False,
              start_layer=0, **kwargs):
    cam = self.head.relprop(cam, **kwargs)
    cam = cam.unsqueeze(1)
    cam = self.pool.relprop(cam, **kwargs)
    cam = self.norm.relprop(cam, **kwargs)
    for blk in reversed(self.blocks):
      cam = blk.relprop(cam, **kwargs)
    self.input_relevance = cam  # not theirs (module docstring)

    if method == "transformer_attribution" or method == "grad":
      cams = []
      for blk in self.blocks:
        grad = blk.attn.get_attn_gradients()
        cam = blk.attn.get_attn_cam()
        cam = cam[0].reshape(-1, cam.shape[-1], cam.shape[-1])
        grad = grad[0].reshape(-1, grad.shape[-1], grad.shape[-1])
        cam = grad * cam
        cam = cam.clamp(min=0).mean(dim=0)
        cams.append(cam.unsqueeze(0))
      rollout = compute_rollout_attention(cams, start_layer=start_layer)
      cam = rollout[:, 0, 1:]
      return cam
    raise NotImplementedError(method)


def from_timm(state_dict, *, img_size, patch_size, in_chans, num_classes, embed_dim, depth,
              num_heads, mlp_ratio=4.0):
  """Their ``VisionTransformer`` in float64 with a timm state dict loaded (the names are
  the same; ``strict``: every tensor is used, none is missing)."""
  model = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                            num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, mlp_ratio=mlp_ratio)
  model.load_state_dict(state_dict, strict=True)
  return model.double().eval()


# ---------------------------------------------- baselines/ViT/ViT_explanation_generator.py


class LRP:
  def __init__(self, model):
    self.model = model
    self.model.eval()

  def generate_LRP(self, input, index=None, method="transformer_attribution",  # noqa: N802
                   is_ablation=False, start_layer=0):
    output = self.model(input)
    kwargs = {"alpha": 1}
    if index is None:
      index = output.argmax(-1).item()

    one_hot = torch.zeros((1, output.size()[-1]), dtype=output.dtype)
    one_hot[0, index] = 1
    one_hot_vector = one_hot.clone()
    one_hot = one_hot.requires_grad_(True)
    one_hot = torch.sum(one_hot * output)

    self.model.zero_grad()
    one_hot.backward(retain_graph=True)

    return self.model.relprop(one_hot_vector, method=method, is_ablation=is_ablation,
                              start_layer=start_layer, **kwargs)
