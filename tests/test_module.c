/*
 * test_module.c - the Module API against MegEngine's test_module.py: traversal
 * order and dedup (the worked example of the reference notes, §3.4),
 * state_dict / load_state_dict, hooks, modes, apply, replace_param, reset,
 * zero_grad, repr, Sequential, convert/revert.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sbn/sbn.h"

/* ---- a user-defined module: forward = bn(i(x)) or i(x) or bn(x) ------------------ */

static int my_forward(sbn_module *m, sbn_tensor *x, sbn_tensor **out) {
  sbn_tensor *cur = sbn_tensor_ref(x), *next = NULL;
  const char *order[2] = {"i", "bn"};
  for (int k = 0; k < 2; k++) {
    sbn_module *sub = sbn_module_get_module(m, order[k]);
    if (!sub) continue;
    int rc = sbn_module_call(sub, cur, &next);
    if (rc != SBN_OK) {
      sbn_tensor_free(cur);
      return rc;
    }
    sbn_tensor_replace(&cur, next);
  }
  *out = cur;
  return SBN_OK;
}

static const sbn_module_vtable my_vt = {.type_name = "MyModule", .forward = my_forward};
static const sbn_module_vtable inner_vt = {.type_name = "InnerModule", .forward = my_forward};

static sbn_module *bn2d(size_t C) {
  sbn_bn_options o;
  sbn_bn_options_init(&o, C);
  sbn_module *m;
  ck_assert_int_eq(sbn_batchnorm_new(&o, &m), SBN_OK);
  return m;
}

static sbn_tensor *ones(size_t n) {
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_new(1, &n, &t), SBN_OK);
  sbn_tensor_fill(t, 1.0f);
  return t;
}

/* MegEngine's MyModule: attributes i (InnerModule with bn), bn, param, buff,
 * set in an order that is not sorted on purpose. */
static sbn_module *make_my_module(void) {
  sbn_module *m, *inner, *bn_i = bn2d(4), *bn = bn2d(4);
  ck_assert_int_eq(sbn_module_new(&my_vt, NULL, &m), SBN_OK);
  ck_assert_int_eq(sbn_module_new(&inner_vt, NULL, &inner), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(inner, "bn", bn_i), SBN_OK);
  sbn_tensor *param = ones(1), *buff = ones(1);
  ck_assert_int_eq(sbn_module_set_parameter(m, "param", param), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(m, "i", inner), SBN_OK);
  ck_assert_int_eq(sbn_module_set_buffer(m, "buff", buff), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(m, "bn", bn), SBN_OK);
  /* The module holds its own references now. */
  sbn_tensor_free(param);
  sbn_tensor_free(buff);
  sbn_module_free(bn_i);
  sbn_module_free(bn);
  sbn_module_free(inner);
  return m;
}

/* Joins a list's keys with spaces. */
static char *keys(const sbn_named_list *l) {
  static char buf[2048];
  buf[0] = '\0';
  for (size_t i = 0; i < l->count; i++) {
    if (i) strcat(buf, " ");
    strcat(buf, l->names[i][0] ? l->names[i] : "<root>");
  }
  return buf;
}

#define ASSERT_KEYS(call, expect)                                                                  \
  do {                                                                                             \
    sbn_named_list l_ = {0};                                                                       \
    ck_assert_int_eq((call), SBN_OK);                                                              \
    ck_assert_str_eq(keys(&l_), (expect));                                                         \
    sbn_named_list_release(&l_);                                                                   \
  } while (0)

/* ---- traversal ---------------------------------------------------------------------- */

START_TEST(test_worked_example_orders) {
  sbn_module *m = make_my_module();
  ASSERT_KEYS(sbn_module_named_children(m, &l_), "bn i");
  ASSERT_KEYS(sbn_module_named_modules(m, NULL, &l_), "<root> bn i i.bn");
  ASSERT_KEYS(sbn_module_named_modules(m, "x", &l_), "x x.bn x.i x.i.bn");
  ASSERT_KEYS(sbn_module_named_buffers(m, NULL, 1, &l_),
              "bn.running_mean bn.running_var buff i.bn.running_mean i.bn.running_var");
  ASSERT_KEYS(sbn_module_named_parameters(m, NULL, 1, &l_),
              "bn.bias bn.weight i.bn.bias i.bn.weight param");
  ASSERT_KEYS(sbn_module_named_parameters(m, "x", 1, &l_),
              "x.bn.bias x.bn.weight x.i.bn.bias x.i.bn.weight x.param");
  ASSERT_KEYS(sbn_module_named_tensors(m, NULL, 1, &l_),
              "bn.bias bn.running_mean bn.running_var bn.weight buff i.bn.bias "
              "i.bn.running_mean i.bn.running_var i.bn.weight param");
  ASSERT_KEYS(sbn_module_named_tensors(m, NULL, 0, &l_), "buff param");
  ASSERT_KEYS(sbn_module_parameters(m, 0, &l_), "param");
  /* Items and parents agree with the keys. */
  sbn_named_list l = {0};
  ck_assert_int_eq(sbn_module_modules(m, &l), SBN_OK);
  ck_assert_int_eq(l.kind, SBN_LIST_MODULES);
  ck_assert_ptr_eq(l.items[0], m);
  ck_assert_ptr_null(l.parents[0]);
  ck_assert_ptr_eq(l.items[3], sbn_module_get_module(m, "i.bn"));
  ck_assert_ptr_eq(l.parents[3], sbn_module_get_module(m, "i"));
  sbn_named_list_release(&l);
  ck_assert_int_eq(sbn_module_tensors(m, 1, &l), SBN_OK);
  ck_assert_int_eq(l.kind, SBN_LIST_TENSORS);
  ck_assert_ptr_eq(l.items[4], sbn_module_get_tensor(m, "buff"));
  ck_assert_ptr_eq(l.parents[4], m);
  sbn_named_list_release(&l);
  /* Stable across calls. */
  for (int k = 0; k < 100; k++)
    ASSERT_KEYS(sbn_module_named_tensors(m, NULL, 1, &l_),
                "bn.bias bn.running_mean bn.running_var bn.weight buff i.bn.bias "
                "i.bn.running_mean i.bn.running_var i.bn.weight param");
  sbn_module_free(m);
}
END_TEST

START_TEST(test_shared_submodule_and_param) {
  sbn_module *m = make_my_module();
  ck_assert_int_eq(sbn_module_set_module(m, "h", sbn_module_get_module(m, "i")), SBN_OK);
  ASSERT_KEYS(sbn_module_named_modules(m, NULL, &l_), "<root> bn h h.bn");
  ASSERT_KEYS(sbn_module_named_children(m, &l_), "bn h");
  ASSERT_KEYS(sbn_module_named_parameters(m, NULL, 1, &l_),
              "bn.bias bn.weight h.bn.bias h.bn.weight param");
  /* state_dict deduplicates per module only: the shared child is one
   * attribute pair of the same parent, so it appears once, under 'h'. */
  sbn_state_dict sd;
  ck_assert_int_eq(sbn_module_state_dict(m, NULL, 1, &sd), SBN_OK);
  ck_assert_uint_eq(sd.count, 10);
  ck_assert_str_eq(sd.keys[6], "h.bn.bias");
  sbn_state_dict_release(&sd);
  sbn_module_free(m);

  /* conv1.weight = conv0.weight: listed once, under the first key; but twice
   * in state_dict (different owners). */
  sbn_module *root, *c0 = bn2d(2), *c1 = bn2d(2);
  ck_assert_int_eq(sbn_module_new(&my_vt, NULL, &root), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(root, "conv0", c0), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(root, "conv1", c1), SBN_OK);
  ck_assert_int_eq(sbn_module_set_parameter(c1, "weight", sbn_module_get_tensor(c0, "weight")),
                   SBN_OK);
  ASSERT_KEYS(sbn_module_named_parameters(root, NULL, 1, &l_),
              "conv0.bias conv0.weight conv1.bias");
  ck_assert_int_eq(sbn_module_state_dict(root, NULL, 1, &sd), SBN_OK);
  ck_assert_uint_eq(sd.count, 8);
  ck_assert_ptr_eq(sbn_state_dict_get(&sd, "conv0.weight"), sbn_state_dict_get(&sd, "conv1.weight"));
  sbn_state_dict_release(&sd);
  sbn_module_free(c0);
  sbn_module_free(c1);
  sbn_module_free(root);
}
END_TEST

START_TEST(test_lists_and_paths) {
  sbn_module *m;
  ck_assert_int_eq(sbn_module_new(&my_vt, NULL, &m), SBN_OK);
  for (int k = 0; k < 12; k++) {
    sbn_module *b = bn2d(1);
    ck_assert_int_eq(sbn_module_append_module(m, "a", b), SBN_OK);
    sbn_module_free(b);
  }
  sbn_tensor *t = ones(2);
  ck_assert_int_eq(sbn_module_append_parameter(m, "ps", t), SBN_OK);
  ck_assert_int_eq(sbn_module_append_buffer(m, "ps", t), SBN_EINVAL); /* already a parameter */
  ck_assert_int_eq(sbn_module_set_buffer(m, "B", t), SBN_EINVAL);
  sbn_tensor_free(t);
  /* Index order inside a list (a.2 before a.10); uppercase sorts first. */
  t = ones(1);
  ck_assert_int_eq(sbn_module_set_buffer(m, "Z", t), SBN_OK);
  sbn_tensor_free(t);
  ASSERT_KEYS(sbn_module_named_children(m, &l_), "a.0 a.1 a.2 a.3 a.4 a.5 a.6 a.7 a.8 a.9 a.10 a.11");
  ASSERT_KEYS(sbn_module_named_tensors(m, NULL, 0, &l_), "Z ps.0");
  ck_assert_ptr_nonnull(sbn_module_get_module(m, "a.10"));
  ck_assert_ptr_nonnull(sbn_module_get_tensor(m, "a.10.running_var"));
  ck_assert_ptr_null(sbn_module_get_module(m, "a.12"));
  ck_assert_ptr_null(sbn_module_get_module(m, "a"));
  ck_assert_ptr_null(sbn_module_get_tensor(m, "a.1.nothing"));
  ck_assert_ptr_null(sbn_module_get_tensor(m, "Z.x"));
  ck_assert_int_eq(sbn_module_set_module(m, "Z", sbn_module_get_module(m, "a.0")), SBN_OK);
  ck_assert_int_eq(sbn_module_append_module(m, "Z", m), SBN_EINVAL); /* not a list */
  /* Bad names and cycles. */
  ck_assert_int_eq(sbn_module_set_module(m, "x.y", sbn_module_get_module(m, "a.0")), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "contains a '.'"));
  ck_assert_int_eq(sbn_module_set_module(m, "", sbn_module_get_module(m, "a.0")), SBN_EINVAL);
  ck_assert_int_eq(sbn_module_set_module(m, "self", m), SBN_EINVAL);
  sbn_module *child;
  ck_assert_int_eq(sbn_module_new(&inner_vt, NULL, &child), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(m, "child", child), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(child, "up", m), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "contain itself"));
  /* A NULL value removes the attribute. */
  ck_assert_int_eq(sbn_module_set_module(m, "child", NULL), SBN_OK);
  ck_assert_ptr_null(sbn_module_get_module(m, "child"));
  sbn_module_free(child);
  sbn_module_free(m);
}
END_TEST

/* ---- state dicts -------------------------------------------------------------------- */

START_TEST(test_state_dict_order_and_prefix) {
  sbn_module *m = make_my_module();
  sbn_state_dict sd;
  ck_assert_int_eq(sbn_module_state_dict(m, "net.", 0, &sd), SBN_OK);
  const char *want[] = {"net.buff",
                        "net.param",
                        "net.bn.bias",
                        "net.bn.running_mean",
                        "net.bn.running_var",
                        "net.bn.weight",
                        "net.i.bn.bias",
                        "net.i.bn.running_mean",
                        "net.i.bn.running_var",
                        "net.i.bn.weight"};
  ck_assert_uint_eq(sd.count, 10);
  for (size_t i = 0; i < 10; i++) ck_assert_str_eq(sd.keys[i], want[i]);
  /* BN entries are flat (C,) and copies without keep_var. */
  ck_assert_int_eq(sbn_tensor_ndim(sd.values[3]), 1);
  ck_assert_uint_eq(sbn_tensor_dim(sd.values[3], 0), 4);
  ck_assert_ptr_ne(sd.values[3], sbn_module_get_tensor(m, "bn.running_mean"));
  sbn_state_dict_release(&sd);
  ck_assert_int_eq(sbn_module_state_dict(m, NULL, 1, &sd), SBN_OK);
  ck_assert_str_eq(sd.keys[0], "buff");
  ck_assert_ptr_eq(sd.values[3], sbn_module_get_tensor(m, "bn.running_mean"));
  sbn_state_dict_release(&sd);
  sbn_module_free(m);
}
END_TEST

/* Every value of m, flattened, for before/after comparisons. */
static float *snapshot(sbn_module *m, size_t *n) {
  sbn_state_dict sd;
  ck_assert_int_eq(sbn_module_state_dict(m, NULL, 0, &sd), SBN_OK);
  size_t total = 0;
  for (size_t i = 0; i < sd.count; i++) total += sbn_tensor_numel(sd.values[i]);
  float *v = malloc(total * sizeof(float)), *p = v;
  for (size_t i = 0; i < sd.count; i++) {
    memcpy(p, sbn_tensor_cdata(sd.values[i]), sbn_tensor_numel(sd.values[i]) * sizeof(float));
    p += sbn_tensor_numel(sd.values[i]);
  }
  sbn_state_dict_release(&sd);
  *n = total;
  return v;
}

static void assert_unchanged(sbn_module *m, const float *before, size_t n) {
  size_t k;
  float *now = snapshot(m, &k);
  ck_assert_uint_eq(k, n);
  ck_assert_msg(memcmp(now, before, n * sizeof(float)) == 0, "module changed by a failed load");
  free(now);
}

/* A state dict of m with every value replaced by i + 10. */
static void changed_dict(sbn_module *m, sbn_state_dict *sd) {
  ck_assert_int_eq(sbn_module_state_dict(m, NULL, 0, sd), SBN_OK);
  for (size_t i = 0; i < sd->count; i++) sbn_tensor_fill(sd->values[i], (float)i + 10.0f);
}

START_TEST(test_load_state_dict) {
  sbn_module *m = make_my_module();
  size_t n;
  float *orig = snapshot(m, &n);
  sbn_state_dict sd;
  changed_dict(m, &sd);

  /* Round trip. */
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_OK);
  ck_assert(sbn_module_get_tensor(m, "buff") != sd.values[0]);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "buff"))[0] == 10.0f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "i.bn.weight"))[3] == 19.0f);
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_OK);
  sbn_state_dict_release(&sd);
  /* Back to the original values through a dict built by hand. */
  sbn_state_dict_init(&sd);
  {
    sbn_state_dict cur;
    ck_assert_int_eq(sbn_module_state_dict(m, NULL, 0, &cur), SBN_OK);
    const float *p = orig;
    for (size_t i = 0; i < cur.count; i++) {
      memcpy(sbn_tensor_data(cur.values[i]), p, sbn_tensor_numel(cur.values[i]) * sizeof(float));
      p += sbn_tensor_numel(cur.values[i]);
      ck_assert_int_eq(sbn_state_dict_set(&sd, cur.keys[i], cur.values[i]), SBN_OK);
    }
    sbn_state_dict_release(&cur);
  }
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_OK);
  assert_unchanged(m, orig, n);
  sbn_state_dict_release(&sd);

  /* Shape error on a late key: the earlier keys must not have loaded. */
  changed_dict(m, &sd);
  sbn_tensor *bad;
  size_t two = 2;
  ck_assert_int_eq(sbn_tensor_new(1, &two, &bad), SBN_OK);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "param", bad), SBN_OK);
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_ESHAPE);
  ck_assert_str_eq(sbn_last_error(), "param 'param' shape mismatch, should be (1,), got (2,)");
  assert_unchanged(m, orig, n);
  sbn_tensor_free(bad);
  /* BN tensors load from any shape with C elements, not from other sizes. */
  size_t s4[4] = {1, 4, 1, 1}, s3 = 3;
  ck_assert_int_eq(sbn_tensor_new(1, &s3, &bad), SBN_OK);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "param", sbn_module_get_tensor(m, "param")), SBN_OK);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "i.bn.bias", bad), SBN_OK);
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_ESHAPE);
  ck_assert_str_eq(sbn_last_error(), "param 'i.bn.bias' size mismatch, should be 4, got 3");
  assert_unchanged(m, orig, n);
  sbn_tensor_free(bad);
  ck_assert_int_eq(sbn_tensor_new(4, s4, &bad), SBN_OK);
  sbn_tensor_fill(bad, -3.0f);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "i.bn.bias", bad), SBN_OK);
  sbn_tensor_free(bad);

  /* Unused key, strict: error naming it, nothing loaded. */
  sbn_tensor *extra = ones(1);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "extra", extra), SBN_OK);
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_EKEY);
  ck_assert_msg(strstr(sbn_last_error(), "unused keys 'extra'") != NULL, "%s", sbn_last_error());
  assert_unchanged(m, orig, n);
  /* Missing key too: both named. */
  ck_assert_int_eq(sbn_state_dict_remove(&sd, "bn.bias"), SBN_OK);
  ck_assert_int_eq(sbn_state_dict_remove(&sd, "bn.bias"), SBN_EKEY);
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_EKEY);
  ck_assert_msg(strstr(sbn_last_error(), "unused keys 'extra'; missing keys 'bn.bias'") != NULL,
                "%s", sbn_last_error());
  assert_unchanged(m, orig, n);
  ck_assert_int_eq(sbn_state_dict_remove(&sd, "extra"), SBN_OK);
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 1), SBN_EKEY);
  ck_assert_msg(strstr(sbn_last_error(), "missing keys 'bn.bias'") != NULL, "%s", sbn_last_error());
  assert_unchanged(m, orig, n);
  /* Not strict: the rest loads, the missing one keeps its value. */
  ck_assert_int_eq(sbn_state_dict_set(&sd, "extra", extra), SBN_OK);
  ck_assert_int_eq(sbn_module_load_state_dict(m, &sd, 0), SBN_OK);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "bn.bias"))[0] == 0.0f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "i.bn.bias"))[2] == -3.0f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "buff"))[0] == 10.0f);
  sbn_tensor_free(extra);
  sbn_state_dict_release(&sd);
  free(orig);
  sbn_module_free(m);
}
END_TEST

/* A loader callback: 5 for keys under "bn.", missing otherwise. */
static int loader(const char *key, const sbn_tensor *var, sbn_tensor **value, void *ud) {
  (*(int *)ud)++;
  if (strncmp(key, "bn.", 3) != 0) return SBN_OK;
  int rc = sbn_tensor_clone(var, value);
  if (rc == SBN_OK) sbn_tensor_fill(*value, 5.0f);
  return rc;
}

START_TEST(test_load_state_dict_callback) {
  sbn_module *m = make_my_module();
  size_t n;
  float *orig = snapshot(m, &n);
  int calls = 0;
  ck_assert_int_eq(sbn_module_load_state_dict_cb(m, loader, &calls, 1), SBN_EKEY);
  ck_assert_int_eq(calls, 10);
  ck_assert_msg(strstr(sbn_last_error(), "missing keys 'buff', 'param', 'i.bn.bias'") != NULL,
                "%s", sbn_last_error());
  assert_unchanged(m, orig, n);
  ck_assert_int_eq(sbn_module_load_state_dict_cb(m, loader, &calls, 0), SBN_OK);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "bn.running_var"))[1] == 5.0f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "i.bn.running_var"))[1] == 1.0f);
  free(orig);
  sbn_module_free(m);
}
END_TEST

/* ---- hooks -------------------------------------------------------------------------- */

static char hook_log[1024];

static const char *who(sbn_module *m, sbn_module *root) {
  if (m == root) return "m";
  if (m == sbn_module_get_module(root, "i")) return "i";
  if (m == sbn_module_get_module(root, "i.bn")) return "i.bn";
  if (m == sbn_module_get_module(root, "bn")) return "bn";
  return "?";
}

static sbn_tensor *plus(const sbn_tensor *x, float v) {
  sbn_tensor *y;
  ck_assert_int_eq(sbn_tensor_clone(x, &y), SBN_OK);
  for (size_t i = 0; i < sbn_tensor_numel(y); i++) sbn_tensor_data(y)[i] += v;
  return y;
}

static int pre_add1(sbn_module *m, sbn_tensor **in, void *ud) {
  snprintf(hook_log + strlen(hook_log), sizeof(hook_log) - strlen(hook_log), "pre:%s ",
           who(m, ud));
  sbn_tensor_replace(in, plus(*in, 1.0f));
  return SBN_OK;
}

static int post_add1(sbn_module *m, sbn_tensor *in, sbn_tensor **out, void *ud) {
  (void)in;
  snprintf(hook_log + strlen(hook_log), sizeof(hook_log) - strlen(hook_log), "post:%s ",
           who(m, ud));
  sbn_tensor_replace(out, plus(*out, 1.0f));
  return SBN_OK;
}

typedef struct reg_ctx {
  sbn_module *root;
  sbn_hook *handles[8];
  int n;
} reg_ctx;

static int register_both(sbn_module *m, void *ud) {
  reg_ctx *c = ud;
  ck_assert_int_eq(sbn_module_register_forward_pre_hook(m, pre_add1, c->root, &c->handles[c->n++]),
                   SBN_OK);
  ck_assert_int_eq(sbn_module_register_forward_hook(m, post_add1, c->root, &c->handles[c->n++]),
                   SBN_OK);
  return SBN_OK;
}

static sbn_tensor *input_4d(void) {
  size_t shape[4] = {2, 4, 3, 3};
  sbn_tensor *x;
  ck_assert_int_eq(sbn_tensor_new(4, shape, &x), SBN_OK);
  for (size_t i = 0; i < sbn_tensor_numel(x); i++)
    sbn_tensor_data(x)[i] = (float)((i * 7919) % 23) * 0.25f + 1.0f;
  return x;
}

/* MegEngine's test_module_api_hooks. */
START_TEST(test_hooks_megengine) {
  sbn_module *m = make_my_module();
  reg_ctx c = {.root = m};
  ck_assert_int_eq(sbn_module_apply(m, register_both, &c), SBN_OK);
  ck_assert_int_eq(c.n, 8);
  sbn_tensor *x = input_4d(), *y;
  hook_log[0] = '\0';
  ck_assert_int_eq(sbn_module_call(m, x, &y), SBN_OK);
  ck_assert_str_eq(hook_log, "pre:m pre:i pre:i.bn post:i.bn post:i pre:bn post:bn post:m ");
  /* The same computation by hand with hook-free layers. */
  sbn_module *b1 = bn2d(4), *b2 = bn2d(4);
  sbn_tensor *x1 = plus(x, 1), *x2 = plus(x1, 1), *x3 = plus(x2, 1), *o1, *o2;
  ck_assert_int_eq(sbn_module_call(b1, x3, &o1), SBN_OK);
  sbn_tensor *o1a = plus(o1, 1), *o1b = plus(o1a, 1), *o1c = plus(o1b, 1);
  ck_assert_int_eq(sbn_module_call(b2, o1c, &o2), SBN_OK);
  sbn_tensor *o2a = plus(o2, 1), *o2b = plus(o2a, 1);
  ck_assert(memcmp(sbn_tensor_cdata(y), sbn_tensor_cdata(o2b), sbn_tensor_numel(y) * 4) == 0);
  ck_assert(memcmp(sbn_tensor_cdata(sbn_module_get_tensor(m, "i.bn.running_mean")),
                   sbn_tensor_cdata(sbn_module_get_tensor(b1, "running_mean")), 16) == 0);
  ck_assert(memcmp(sbn_tensor_cdata(sbn_module_get_tensor(m, "bn.running_mean")),
                   sbn_tensor_cdata(sbn_module_get_tensor(b2, "running_mean")), 16) == 0);
  sbn_tensor_free(y);
  /* Remove every handle (twice: idempotent); no hook runs any more. */
  for (int k = 0; k < 8; k++) {
    sbn_hook_remove(c.handles[k]);
    sbn_hook_remove(c.handles[k]);
  }
  hook_log[0] = '\0';
  ck_assert_int_eq(sbn_module_call(m, x, &y), SBN_OK);
  ck_assert_str_eq(hook_log, "");
  sbn_tensor_free(y);
  /* The raw forward never runs hooks. */
  sbn_hook *h;
  ck_assert_int_eq(sbn_module_register_forward_pre_hook(m, pre_add1, m, &h), SBN_OK);
  ck_assert_int_eq(sbn_module_forward(m, x, &y), SBN_OK);
  ck_assert_str_eq(hook_log, "");
  sbn_tensor_free(y);
  sbn_module_free(m); /* the hook handle outlives the module */
  sbn_hook_remove(h);
  sbn_hook_free(h);
  for (int k = 0; k < 8; k++) sbn_hook_free(c.handles[k]);
  sbn_tensor *all[] = {x, x1, x2, x3, o1, o1a, o1b, o1c, o2, o2a, o2b};
  for (size_t k = 0; k < sizeof(all) / sizeof(all[0]); k++) sbn_tensor_free(all[k]);
  sbn_module_free(b1);
  sbn_module_free(b2);
}
END_TEST

static int pre_double(sbn_module *m, sbn_tensor **in, void *ud) {
  (void)m, (void)ud;
  sbn_tensor *y = plus(*in, 0);
  for (size_t i = 0; i < sbn_tensor_numel(y); i++) sbn_tensor_data(y)[i] *= 2;
  sbn_tensor_replace(in, y);
  return SBN_OK;
}

static int pre_fail(sbn_module *m, sbn_tensor **in, void *ud) {
  (void)m, (void)in, (void)ud;
  return SBN_EINVAL;
}

static int ident_forward(sbn_module *m, sbn_tensor *x, sbn_tensor **out) {
  (void)m;
  *out = sbn_tensor_ref(x);
  return SBN_OK;
}
static const sbn_module_vtable ident_vt = {.type_name = "Identity", .forward = ident_forward};

START_TEST(test_hook_order_and_replacement) {
  sbn_module *m;
  ck_assert_int_eq(sbn_module_new(&ident_vt, NULL, &m), SBN_OK);
  sbn_hook *h1, *h2, *h3;
  ck_assert_int_eq(sbn_module_register_forward_pre_hook(m, pre_double, NULL, &h1), SBN_OK);
  ck_assert_int_eq(sbn_module_register_forward_pre_hook(m, pre_add1, m, &h2), SBN_OK);
  float v = 3;
  size_t one = 1;
  sbn_tensor *x, *y;
  ck_assert_int_eq(sbn_tensor_from_data(1, &one, &v, &x), SBN_OK);
  ck_assert_int_eq(sbn_module_call(m, x, &y), SBN_OK);
  ck_assert(sbn_tensor_cdata(y)[0] == 7.0f); /* (3*2)+1, registration order */
  ck_assert(sbn_tensor_cdata(x)[0] == 3.0f); /* the caller's input untouched */
  sbn_tensor_free(y);
  sbn_hook_remove(h1);
  ck_assert_int_eq(sbn_module_call(m, x, &y), SBN_OK);
  ck_assert(sbn_tensor_cdata(y)[0] == 4.0f);
  sbn_tensor_free(y);
  /* Output replacement. */
  ck_assert_int_eq(sbn_module_register_forward_hook(m, post_add1, m, &h3), SBN_OK);
  ck_assert_int_eq(sbn_module_call(m, x, &y), SBN_OK);
  ck_assert(sbn_tensor_cdata(y)[0] == 5.0f);
  sbn_tensor_free(y);
  /* A failing hook aborts the call with its status. */
  sbn_hook *hf;
  ck_assert_int_eq(sbn_module_register_forward_pre_hook(m, pre_fail, NULL, &hf), SBN_OK);
  y = NULL;
  ck_assert_int_eq(sbn_module_call(m, x, &y), SBN_EINVAL);
  ck_assert_ptr_null(y);
  sbn_hook_remove(hf);
  sbn_hook_free(hf);
  sbn_hook_free(h1);
  sbn_hook_free(h2); /* freeing the handle keeps the hook */
  ck_assert_int_eq(sbn_module_call(m, x, &y), SBN_OK);
  ck_assert(sbn_tensor_cdata(y)[0] == 5.0f);
  sbn_tensor_free(y);
  sbn_hook_free(h3);
  sbn_tensor_free(x);
  sbn_module_free(m);
}
END_TEST

/* ---- modes, apply, bulk operations -------------------------------------------------- */

static int log_apply(sbn_module *m, void *ud) {
  strcat(hook_log, who(m, ud));
  strcat(hook_log, " ");
  return SBN_OK;
}

START_TEST(test_train_eval_apply) {
  sbn_module *m = make_my_module();
  sbn_module *bn = sbn_module_get_module(m, "bn"), *i = sbn_module_get_module(m, "i"),
             *ibn = sbn_module_get_module(m, "i.bn");
  ck_assert(sbn_module_is_training(m) && sbn_module_is_training(ibn));
  ck_assert_int_eq(sbn_module_eval(m), SBN_OK);
  ck_assert(!sbn_module_is_training(m) && !sbn_module_is_training(bn));
  ck_assert(!sbn_module_is_training(i) && !sbn_module_is_training(ibn));
  ck_assert_int_eq(sbn_module_train(bn, 1, 1), SBN_OK);
  ck_assert(!sbn_module_is_training(m) && sbn_module_is_training(bn));
  ck_assert(!sbn_module_is_training(i) && !sbn_module_is_training(ibn));
  ck_assert_int_eq(sbn_module_train(i, 1, 1), SBN_OK);
  ck_assert(!sbn_module_is_training(m) && sbn_module_is_training(i) && sbn_module_is_training(ibn));
  ck_assert_int_eq(sbn_module_train(m, 0, 0), SBN_OK); /* not recursive */
  ck_assert(!sbn_module_is_training(m) && sbn_module_is_training(i));
  hook_log[0] = '\0';
  ck_assert_int_eq(sbn_module_apply(m, log_apply, m), SBN_OK);
  ck_assert_str_eq(hook_log, "m bn i i.bn ");
  ck_assert_int_eq(sbn_module_disable_quantize(m, 1), SBN_OK);
  ck_assert(sbn_module_quantize_disabled(m) && sbn_module_quantize_disabled(ibn));
  ck_assert_int_eq(sbn_module_disable_quantize(i, 0), SBN_OK);
  ck_assert(sbn_module_quantize_disabled(m) && !sbn_module_quantize_disabled(ibn));
  sbn_module_free(m);
}
END_TEST

START_TEST(test_replace_param) {
  sbn_module *m = make_my_module();
  size_t visited = 0;
  ck_assert_int_eq(sbn_module_replace_param(m, NULL, 0, 0, &visited), SBN_OK);
  ck_assert_uint_eq(visited, 5); /* bn.bias bn.weight i.bn.bias i.bn.weight param */
  sbn_tensor *p[6] = {0}, *np = ones(1), *bad = ones(3);
  sbn_tensor_fill(np, 42.0f);
  p[4 + 1] = np; /* start_pos 1: param is number 5 */
  ck_assert_int_eq(sbn_module_replace_param(m, p, 6, 1, &visited), SBN_OK);
  ck_assert_uint_eq(visited, 5);
  ck_assert_ptr_eq(sbn_module_get_tensor(m, "param"), np);
  ck_assert(sbn_tensor_is_parameter(np));
  ck_assert_ptr_nonnull(sbn_tensor_grad(np));
  /* A shape mismatch replaces nothing, not even the entries before it. */
  sbn_tensor *w = sbn_module_get_tensor(m, "bn.bias");
  sbn_tensor *p2[5] = {ones(4), NULL, NULL, bad, NULL};
  ck_assert_int_eq(sbn_module_replace_param(m, p2, 5, 0, NULL), SBN_ESHAPE);
  ck_assert_ptr_eq(sbn_module_get_tensor(m, "bn.bias"), w);
  sbn_tensor_free(p2[0]);
  sbn_tensor_free(np);
  sbn_tensor_free(bad);
  sbn_module_free(m);
}
END_TEST

START_TEST(test_zero_grad_and_reset) {
  sbn_module *m = make_my_module();
  sbn_named_list l = {0};
  ck_assert_int_eq(sbn_module_parameters(m, 1, &l), SBN_OK);
  for (size_t i = 0; i < l.count; i++) sbn_tensor_fill(sbn_tensor_grad(l.items[i]), 3.0f);
  for (size_t i = 0; i < l.count; i++) sbn_tensor_fill(l.items[i], 3.0f);
  ck_assert_int_eq(sbn_module_zero_grad(m), SBN_OK);
  for (size_t i = 0; i < l.count; i++)
    for (size_t j = 0; j < sbn_tensor_numel(l.items[i]); j++) {
      ck_assert(sbn_tensor_cdata(sbn_tensor_grad(l.items[i]))[j] == 0.0f);
      ck_assert(sbn_tensor_cdata(l.items[i])[j] == 3.0f);
    }
  /* A module held twice (its walk is cut by a stamp) and zeroing again. */
  ck_assert_int_eq(sbn_module_set_module(m, "same_bn", sbn_module_get_module(m, "bn")), SBN_OK);
  ck_assert_int_eq(sbn_module_append_module(m, "twice", sbn_module_get_module(m, "i")), SBN_OK);
  ck_assert_int_eq(sbn_module_append_module(m, "twice", sbn_module_get_module(m, "i")), SBN_OK);
  for (int round = 0; round < 2; round++) {
    for (size_t i = 0; i < l.count; i++) sbn_tensor_fill(sbn_tensor_grad(l.items[i]), 5.0f);
    ck_assert_int_eq(sbn_module_zero_grad(m), SBN_OK);
    for (size_t i = 0; i < l.count; i++)
      for (size_t j = 0; j < sbn_tensor_numel(l.items[i]); j++)
        ck_assert(sbn_tensor_cdata(sbn_tensor_grad(l.items[i]))[j] == 0.0f);
  }
  ck_assert_int_eq(sbn_module_zero_grad(NULL), SBN_EINVAL);
  sbn_named_list_release(&l);
  sbn_tensor_fill(sbn_module_get_tensor(m, "i.bn.running_var"), 9.0f);
  ck_assert_int_eq(sbn_module_reset_running_stats(m), SBN_OK);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "i.bn.running_var"))[2] == 1.0f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "i.bn.weight"))[2] == 3.0f);
  ck_assert_int_eq(sbn_module_reset_parameters(m), SBN_OK);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "i.bn.weight"))[2] == 1.0f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "bn.bias"))[2] == 0.0f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "param"))[0] == 3.0f); /* no reset for it */
  sbn_module_free(m);
}
END_TEST

/* ---- repr, Sequential, conversion --------------------------------------------------- */

START_TEST(test_repr_nested_sequential) {
  sbn_bn_options o;
  sbn_bn_options_init(&o, 2);
  sbn_module *a = bn2d(4), *b, *c = bn2d(3), *inner, *outer;
  ck_assert_int_eq(sbn_syncbatchnorm_new(&o, &b), SBN_OK);
  sbn_module *il[2] = {b, c};
  ck_assert_int_eq(sbn_sequential_new(il, 2, &inner), SBN_OK);
  sbn_module *ol[2] = {a, inner};
  ck_assert_int_eq(sbn_sequential_new(ol, 2, &outer), SBN_OK);
  char *s;
  ck_assert_int_eq(sbn_module_repr(outer, &s), SBN_OK);
  ck_assert_str_eq(s, "Sequential(\n"
                      "  (0): BatchNorm(4, eps=1e-05, momentum=0.9, affine=True, "
                      "track_running_stats=True)\n"
                      "  (1): Sequential(\n"
                      "    (0): SyncBatchNorm(2, eps=1e-05, momentum=0.9, affine=True, "
                      "track_running_stats=True)\n"
                      "    (1): BatchNorm(3, eps=1e-05, momentum=0.9, affine=True, "
                      "track_running_stats=True)\n"
                      "  )\n"
                      ")");
  sbn_free(s);
  /* A module with no extra repr and no children; children in insertion
   * order (not sorted), list items expanded. */
  sbn_module *m, *e;
  ck_assert_int_eq(sbn_module_new(&ident_vt, NULL, &e), SBN_OK);
  ck_assert_int_eq(sbn_module_repr(e, &s), SBN_OK);
  ck_assert_str_eq(s, "Identity()");
  sbn_free(s);
  ck_assert_int_eq(sbn_module_new(&my_vt, NULL, &m), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(m, "z", e), SBN_OK);
  ck_assert_int_eq(sbn_module_append_module(m, "list", e), SBN_OK);
  ck_assert_int_eq(sbn_module_append_module(m, "list", e), SBN_OK);
  ck_assert_int_eq(sbn_module_set_module(m, "z", a), SBN_OK); /* keeps its slot */
  ck_assert_int_eq(sbn_module_repr(m, &s), SBN_OK);
  ck_assert_str_eq(s, "MyModule(\n"
                      "  (z): BatchNorm(4, eps=1e-05, momentum=0.9, affine=True, "
                      "track_running_stats=True)\n"
                      "  (list.0): Identity()\n"
                      "  (list.1): Identity()\n"
                      ")");
  sbn_free(s);
  sbn_module_free(m);
  sbn_module_free(e);
  ck_assert_uint_eq(sbn_sequential_len(outer), 2);
  ck_assert_ptr_eq(sbn_sequential_get(outer, 1), inner);
  ck_assert_ptr_null(sbn_sequential_get(outer, 2));
  ck_assert_ptr_null(sbn_sequential_get(a, 0));
  ck_assert_int_eq(sbn_sequential_append(a, b), SBN_EINVAL);
  ASSERT_KEYS(sbn_module_named_modules(outer, NULL, &l_), "<root> 0 1 1.0 1.1");
  sbn_module *all[] = {a, b, c, inner, outer};
  for (int k = 0; k < 5; k++) sbn_module_free(all[k]);
}
END_TEST

START_TEST(test_sequential_forward_backward) {
  sbn_module *a = bn2d(4), *b = bn2d(4), *ra = bn2d(4), *rb = bn2d(4), *seq;
  sbn_module *l[2] = {a, b};
  ck_assert_int_eq(sbn_sequential_new(l, 2, &seq), SBN_OK);
  sbn_tensor_fill(sbn_module_get_tensor(a, "weight"), 1.5f);
  sbn_tensor_fill(sbn_module_get_tensor(ra, "weight"), 1.5f);
  sbn_tensor_fill(sbn_module_get_tensor(b, "bias"), 0.25f);
  sbn_tensor_fill(sbn_module_get_tensor(rb, "bias"), 0.25f);
  sbn_tensor *x = input_4d(), *y, *h, *y2, *dy, *dx, *dh, *dx2;
  ck_assert_int_eq(sbn_module_call(seq, x, &y), SBN_OK);
  ck_assert_int_eq(sbn_module_call(ra, x, &h), SBN_OK);
  ck_assert_int_eq(sbn_module_call(rb, h, &y2), SBN_OK);
  ck_assert(memcmp(sbn_tensor_cdata(y), sbn_tensor_cdata(y2), sbn_tensor_numel(y) * 4) == 0);
  dy = input_4d();
  ck_assert_int_eq(sbn_module_backward(seq, dy, &dx), SBN_OK);
  ck_assert_int_eq(sbn_module_backward(rb, dy, &dh), SBN_OK);
  ck_assert_int_eq(sbn_module_backward(ra, dh, &dx2), SBN_OK);
  ck_assert(memcmp(sbn_tensor_cdata(dx), sbn_tensor_cdata(dx2), sbn_tensor_numel(dx) * 4) == 0);
  ck_assert(memcmp(sbn_tensor_cdata(sbn_tensor_grad(sbn_module_get_tensor(a, "weight"))),
                   sbn_tensor_cdata(sbn_tensor_grad(sbn_module_get_tensor(ra, "weight"))), 16) == 0);
  /* A module without backward stops the chain with SBN_ESTATE. */
  sbn_module *id;
  ck_assert_int_eq(sbn_module_new(&ident_vt, NULL, &id), SBN_OK);
  ck_assert_int_eq(sbn_sequential_append(seq, id), SBN_OK);
  sbn_tensor *bad = NULL;
  ck_assert_int_eq(sbn_module_backward(seq, dy, &bad), SBN_ESTATE);
  ck_assert_ptr_null(bad);
  ck_assert_str_eq(sbn_last_error(), "module 'Identity' has no backward");
  sbn_tensor *all[] = {x, y, h, y2, dy, dx, dh, dx2};
  for (int k = 0; k < 8; k++) sbn_tensor_free(all[k]);
  sbn_module *mods[] = {a, b, ra, rb, seq, id};
  for (int k = 0; k < 6; k++) sbn_module_free(mods[k]);
}
END_TEST

START_TEST(test_convert_revert_round_trip) {
  sbn_module *m = make_my_module();
  /* Share i.bn as a second attribute to check sharing survives. */
  sbn_module *ibn = sbn_module_get_module(m, "i.bn"), *bn = sbn_module_get_module(m, "bn");
  ck_assert_int_eq(sbn_module_set_module(m, "shared", ibn), SBN_OK);
  sbn_tensor_fill(sbn_module_get_tensor(m, "bn.weight"), 2.0f);
  sbn_tensor_fill(sbn_module_get_tensor(m, "i.bn.running_var"), 3.0f);
  sbn_module_train(bn, 0, 1);
  sbn_bn_set_name(bn, "head");
  size_t n0;
  float *before = snapshot(m, &n0);
  sbn_tensor *x = input_4d(), *y0, *y1;
  sbn_module_eval(m);
  ck_assert_int_eq(sbn_module_call(m, x, &y0), SBN_OK);
  sbn_module_train(m, 1, 1);
  sbn_module_train(bn, 0, 1);
  size_t count = 0;
  ck_assert_int_eq(sbn_convert_sync_batchnorm(m, NULL, &count), SBN_OK);
  ck_assert_uint_eq(count, 2);
  ck_assert_int_eq(sbn_bn_kind(bn), 1);
  ck_assert_int_eq(sbn_bn_kind(ibn), 1);
  ck_assert_int_eq(sbn_bn_kind(m), -1);
  ck_assert_ptr_eq(sbn_module_get_module(m, "shared"), sbn_module_get_module(m, "i.bn"));
  ck_assert_ptr_eq(sbn_module_get_module(m, "bn"), bn);
  ck_assert_str_eq(sbn_module_type_name(bn), "SyncBatchNorm");
  ck_assert_str_eq(sbn_bn_layer_name(bn), "head");
  ck_assert(!sbn_module_is_training(bn) && sbn_module_is_training(ibn));
  assert_unchanged(m, before, n0);
  sbn_module_eval(m);
  ck_assert_int_eq(sbn_module_call(m, x, &y1), SBN_OK);
  ck_assert(memcmp(sbn_tensor_cdata(y0), sbn_tensor_cdata(y1), sbn_tensor_numel(y0) * 4) == 0);
  char *s;
  ck_assert_int_eq(sbn_module_repr(bn, &s), SBN_OK);
  ck_assert_str_eq(s, "SyncBatchNorm(4, eps=1e-05, momentum=0.9, affine=True, "
                      "track_running_stats=True)");
  sbn_free(s);
  ck_assert_int_eq(sbn_convert_sync_batchnorm(m, NULL, &count), SBN_OK);
  ck_assert_uint_eq(count, 0);
  ck_assert_int_eq(sbn_revert_sync_batchnorm(m, &count), SBN_OK);
  ck_assert_uint_eq(count, 2);
  ck_assert_int_eq(sbn_bn_kind(bn), 0);
  ck_assert_int_eq(sbn_bn_kind(ibn), 0);
  assert_unchanged(m, before, n0);
  /* A BatchNorm root converts too. */
  sbn_module *solo = bn2d(3);
  ck_assert_int_eq(sbn_convert_sync_batchnorm(solo, NULL, NULL), SBN_OK);
  ck_assert_int_eq(sbn_bn_kind(solo), 1);
  sbn_module_free(solo);
  sbn_tensor_free(x);
  sbn_tensor_free(y0);
  sbn_tensor_free(y1);
  free(before);
  sbn_module_free(m);
}
END_TEST

START_TEST(test_null_arguments) {
  sbn_module *m = NULL;
  sbn_named_list l = {0};
  ck_assert_int_eq(sbn_module_new(NULL, NULL, &m), SBN_EINVAL);
  static const sbn_module_vtable no_forward = {.type_name = "X"};
  ck_assert_int_eq(sbn_module_new(&no_forward, NULL, &m), SBN_EINVAL);
  ck_assert_ptr_null(m);
  ck_assert_int_eq(sbn_module_named_modules(NULL, NULL, &l), SBN_EINVAL);
  ck_assert_int_eq(sbn_module_train(NULL, 1, 1), SBN_EINVAL);
  ck_assert_int_eq(sbn_module_repr(NULL, NULL), SBN_EINVAL);
  sbn_module_free(NULL);
  sbn_hook_remove(NULL);
  sbn_hook_free(NULL);
  sbn_named_list_release(NULL);
  sbn_state_dict_release(NULL);
  sbn_free(NULL);
}
END_TEST

int main(void) {
  Suite *s = suite_create("module");
  TCase *tc = tcase_create("module");
  tcase_add_test(tc, test_worked_example_orders);
  tcase_add_test(tc, test_shared_submodule_and_param);
  tcase_add_test(tc, test_lists_and_paths);
  tcase_add_test(tc, test_state_dict_order_and_prefix);
  tcase_add_test(tc, test_load_state_dict);
  tcase_add_test(tc, test_load_state_dict_callback);
  tcase_add_test(tc, test_hooks_megengine);
  tcase_add_test(tc, test_hook_order_and_replacement);
  tcase_add_test(tc, test_train_eval_apply);
  tcase_add_test(tc, test_replace_param);
  tcase_add_test(tc, test_zero_grad_and_reset);
  tcase_add_test(tc, test_repr_nested_sequential);
  tcase_add_test(tc, test_sequential_forward_backward);
  tcase_add_test(tc, test_convert_revert_round_trip);
  tcase_add_test(tc, test_null_arguments);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
