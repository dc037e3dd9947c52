/* mlp.c - Linear, ReLU, cross-entropy, SGD and the spirals data set. */
#include "mlp.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a deterministic random stream ---------------------------------------- */

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static double uniform(uint64_t *s) { return (double)(splitmix(s) >> 11) * 0x1p-53; }

/* ---- Linear ---------------------------------------------------------------- */

typedef struct linear {
  size_t in, out;
  sbn_tensor *weight, *bias; /* borrowed from the module's attributes */
  sbn_tensor *saved_input;   /* reference kept from the last forward */
} linear;

static int linear_forward(sbn_module *m, sbn_tensor *x, sbn_tensor **out) {
  linear *l = sbn_module_impl(m);
  if (sbn_tensor_ndim(x) != 2 || sbn_tensor_dim(x, 1) != l->in) {
    char buf[64];
    fprintf(stderr, "Linear(%zu, %zu) got input %s\n", l->in, l->out,
            sbn_tensor_shape_str(x, buf, sizeof(buf)));
    return SBN_ESHAPE;
  }
  size_t n = sbn_tensor_dim(x, 0);
  size_t shape[2] = {n, l->out};
  sbn_tensor *y;
  int rc = sbn_tensor_new(2, shape, &y);
  if (rc != SBN_OK)
    return rc;
  const float *xd = sbn_tensor_cdata(x), *w = sbn_tensor_cdata(l->weight),
              *b = sbn_tensor_cdata(l->bias);
  float *yd = sbn_tensor_data(y);
  for (size_t i = 0; i < n; i++)
    for (size_t o = 0; o < l->out; o++) {
      double acc = b[o];
      for (size_t k = 0; k < l->in; k++)
        acc += (double)xd[i * l->in + k] * w[o * l->in + k];
      yd[i * l->out + o] = (float)acc;
    }
  sbn_tensor_replace(&l->saved_input, sbn_tensor_ref(x));
  *out = y;
  return SBN_OK;
}

static int linear_backward(sbn_module *m, sbn_tensor *dy, sbn_tensor **out) {
  linear *l = sbn_module_impl(m);
  if (l->saved_input == NULL)
    return SBN_ESTATE;
  sbn_tensor *x = l->saved_input;
  size_t n = sbn_tensor_dim(x, 0);
  size_t shape[2] = {n, l->in};
  sbn_tensor *dx;
  int rc = sbn_tensor_new(2, shape, &dx);
  if (rc != SBN_OK)
    return rc;
  const float *xd = sbn_tensor_cdata(x), *w = sbn_tensor_cdata(l->weight),
              *g = sbn_tensor_cdata(dy);
  float *dxd = sbn_tensor_data(dx);
  float *dw = sbn_tensor_data(sbn_tensor_grad(l->weight));
  float *db = sbn_tensor_data(sbn_tensor_grad(l->bias));
  for (size_t o = 0; o < l->out; o++) {
    double sb = 0;
    for (size_t i = 0; i < n; i++)
      sb += g[i * l->out + o];
    db[o] += (float)sb;
    for (size_t k = 0; k < l->in; k++) {
      double sw = 0;
      for (size_t i = 0; i < n; i++)
        sw += (double)g[i * l->out + o] * xd[i * l->in + k];
      dw[o * l->in + k] += (float)sw;
    }
  }
  for (size_t i = 0; i < n; i++)
    for (size_t k = 0; k < l->in; k++) {
      double acc = 0;
      for (size_t o = 0; o < l->out; o++)
        acc += (double)g[i * l->out + o] * w[o * l->in + k];
      dxd[i * l->in + k] = (float)acc;
    }
  *out = dx;
  return SBN_OK;
}

static int linear_repr(const sbn_module *m, char *buf, size_t len) {
  const linear *l = sbn_module_impl(m);
  return snprintf(buf, len, "in_features=%zu, out_features=%zu, bias=True", l->in, l->out);
}

static void linear_destroy(void *impl) {
  linear *l = impl;
  sbn_tensor_free(l->saved_input);
  free(l);
}

static const sbn_module_vtable linear_vt = {
    .type_name = "Linear",
    .forward = linear_forward,
    .backward = linear_backward,
    .extra_repr = linear_repr,
    .destroy = linear_destroy,
};

int mlp_linear_new(size_t in, size_t out, uint64_t seed, sbn_module **m) {
  linear *l = calloc(1, sizeof(*l));
  if (l == NULL)
    return SBN_ENOMEM;
  l->in = in;
  l->out = out;
  int rc = sbn_module_new(&linear_vt, l, m);
  if (rc != SBN_OK)
    return rc;
  size_t wshape[2] = {out, in}, bshape[1] = {out};
  sbn_tensor *w = NULL, *b = NULL;
  if ((rc = sbn_tensor_new(2, wshape, &w)) != SBN_OK ||
      (rc = sbn_tensor_new(1, bshape, &b)) != SBN_OK)
    goto fail;
  /* Kaiming-uniform-like initialization from the seed. */
  double bound = 1.0 / sqrt((double)in);
  float *wd = sbn_tensor_data(w), *bd = sbn_tensor_data(b);
  for (size_t i = 0; i < in * out; i++)
    wd[i] = (float)((uniform(&seed) * 2 - 1) * bound * sqrt(3.0));
  for (size_t i = 0; i < out; i++)
    bd[i] = (float)((uniform(&seed) * 2 - 1) * bound);
  if ((rc = sbn_module_set_parameter(*m, "weight", w)) != SBN_OK ||
      (rc = sbn_module_set_parameter(*m, "bias", b)) != SBN_OK)
    goto fail;
  l->weight = w;
  l->bias = b;
  sbn_tensor_free(w);
  sbn_tensor_free(b);
  return SBN_OK;
fail:
  sbn_tensor_free(w);
  sbn_tensor_free(b);
  sbn_module_free(*m);
  *m = NULL;
  return rc;
}

/* ---- ReLU ------------------------------------------------------------------ */

typedef struct relu {
  sbn_tensor *saved_output;
} relu;

static int relu_forward(sbn_module *m, sbn_tensor *x, sbn_tensor **out) {
  relu *r = sbn_module_impl(m);
  sbn_tensor *y;
  int rc = sbn_tensor_clone(x, &y);
  if (rc != SBN_OK)
    return rc;
  float *d = sbn_tensor_data(y);
  for (size_t i = 0, n = sbn_tensor_numel(y); i < n; i++)
    d[i] = d[i] > 0 ? d[i] : 0;
  sbn_tensor_replace(&r->saved_output, sbn_tensor_ref(y));
  *out = y;
  return SBN_OK;
}

static int relu_backward(sbn_module *m, sbn_tensor *dy, sbn_tensor **out) {
  relu *r = sbn_module_impl(m);
  if (r->saved_output == NULL)
    return SBN_ESTATE;
  sbn_tensor *dx;
  int rc = sbn_tensor_clone(dy, &dx);
  if (rc != SBN_OK)
    return rc;
  float *d = sbn_tensor_data(dx);
  const float *y = sbn_tensor_cdata(r->saved_output);
  for (size_t i = 0, n = sbn_tensor_numel(dx); i < n; i++)
    d[i] = y[i] > 0 ? d[i] : 0;
  *out = dx;
  return SBN_OK;
}

static void relu_destroy(void *impl) {
  relu *r = impl;
  sbn_tensor_free(r->saved_output);
  free(r);
}

static const sbn_module_vtable relu_vt = {
    .type_name = "ReLU",
    .forward = relu_forward,
    .backward = relu_backward,
    .destroy = relu_destroy,
};

int mlp_relu_new(sbn_module **m) {
  relu *r = calloc(1, sizeof(*r));
  if (r == NULL)
    return SBN_ENOMEM;
  return sbn_module_new(&relu_vt, r, m);
}

/* ---- loss and optimizer ----------------------------------------------------- */

double mlp_xent(sbn_tensor *logits, const int *labels, double scale, sbn_tensor **dlogits,
                size_t *correct) {
  size_t n = sbn_tensor_dim(logits, 0), k = sbn_tensor_dim(logits, 1);
  const float *z = sbn_tensor_cdata(logits);
  *dlogits = NULL;
  if (sbn_tensor_new(2, sbn_tensor_shape(logits), dlogits) != SBN_OK)
    return NAN;
  float *dz = sbn_tensor_data(*dlogits);
  double loss = 0;
  *correct = 0;
  for (size_t i = 0; i < n; i++) {
    const float *row = z + i * k;
    size_t best = 0;
    for (size_t c = 1; c < k; c++)
      if (row[c] > row[best])
        best = c;
    *correct += best == (size_t)labels[i];
    double mx = row[best], s = 0;
    for (size_t c = 0; c < k; c++)
      s += exp(row[c] - mx);
    loss += log(s) + mx - row[labels[i]];
    for (size_t c = 0; c < k; c++) {
      double p = exp(row[c] - mx) / s;
      dz[i * k + c] = (float)((p - (c == (size_t)labels[i])) * scale / (double)n);
    }
  }
  return n ? loss / (double)n : 0;
}

int mlp_sgd_init(mlp_sgd *opt, sbn_module *model, double lr, double momentum,
                 double weight_decay) {
  memset(opt, 0, sizeof(*opt));
  opt->lr = lr;
  opt->momentum = momentum;
  opt->weight_decay = weight_decay;
  int rc = sbn_module_parameters(model, 1, &opt->params);
  if (rc != SBN_OK)
    return rc;
  opt->velocity = calloc(opt->params.count + 1, sizeof(float *));
  for (size_t i = 0; opt->velocity != NULL && i < opt->params.count; i++) {
    opt->velocity[i] = calloc(sbn_tensor_numel(opt->params.items[i]) + 1, sizeof(float));
    if (opt->velocity[i] == NULL) {
      mlp_sgd_release(opt);
      return SBN_ENOMEM;
    }
  }
  if (opt->velocity == NULL) {
    mlp_sgd_release(opt);
    return SBN_ENOMEM;
  }
  return SBN_OK;
}

void mlp_sgd_step(mlp_sgd *opt) {
  for (size_t i = 0; i < opt->params.count; i++) {
    sbn_tensor *p = opt->params.items[i], *g = sbn_tensor_grad(p);
    if (g == NULL)
      continue;
    float *pd = sbn_tensor_data(p), *v = opt->velocity[i];
    const float *gd = sbn_tensor_cdata(g);
    for (size_t j = 0, n = sbn_tensor_numel(p); j < n; j++) {
      float grad = gd[j] + (float)opt->weight_decay * pd[j];
      v[j] = (float)opt->momentum * v[j] + grad;
      pd[j] -= (float)opt->lr * v[j];
    }
  }
}

void mlp_sgd_release(mlp_sgd *opt) {
  if (opt->velocity != NULL)
    for (size_t i = 0; i < opt->params.count; i++)
      free(opt->velocity[i]);
  free(opt->velocity);
  sbn_named_list_release(&opt->params);
  memset(opt, 0, sizeof(*opt));
}

/* ---- data ------------------------------------------------------------------- */

void mlp_point(uint64_t i, size_t classes, uint64_t seed, float x[MLP_FEATURES], int *label) {
  uint64_t s = seed ^ (i * 0xD1B54A32D192ED03ull);
  int c = (int)(i % classes);
  double t = uniform(&s);              /* position along the arm, 0..1 */
  double r = 0.1 + 0.9 * t;            /* radius grows along the arm */
  double angle = 3.5 * t * M_PI + 2 * M_PI * c / (double)classes;
  double nx = (uniform(&s) - 0.5) * 0.12, ny = (uniform(&s) - 0.5) * 0.12;
  /* An offset far from 0 makes the first BatchNorm earn its keep. */
  x[0] = (float)(r * cos(angle) + nx + 3.0);
  x[1] = (float)(r * sin(angle) + ny - 2.0);
  *label = c;
}

/* ---- the classifier ------------------------------------------------------- */

int mlp_build(size_t in, size_t hidden, size_t classes, sbn_group *group, uint64_t seed,
              sbn_module **model) {
  sbn_module *layers[7] = {0};
  sbn_bn_options o;
  int rc;
  *model = NULL;
  sbn_bn_options_init(&o, hidden);
  o.group = group;
  if ((rc = mlp_linear_new(in, hidden, seed * 3 + 1, &layers[0])) != SBN_OK ||
      (rc = sbn_syncbatchnorm_new(&o, &layers[1])) != SBN_OK ||
      (rc = mlp_relu_new(&layers[2])) != SBN_OK ||
      (rc = mlp_linear_new(hidden, hidden, seed * 3 + 2, &layers[3])) != SBN_OK ||
      (rc = sbn_syncbatchnorm_new(&o, &layers[4])) != SBN_OK ||
      (rc = mlp_relu_new(&layers[5])) != SBN_OK ||
      (rc = mlp_linear_new(hidden, classes, seed * 3 + 3, &layers[6])) != SBN_OK)
    goto done;
  rc = sbn_sequential_new(layers, 7, model);
done:
  for (int i = 0; i < 7; i++)
    sbn_module_free(layers[i]); /* the Sequential holds its own references */
  return rc;
}
