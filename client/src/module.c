/*
 * module.c - the Module base: attributes, traversal in MegEngine's order,
 * hooks, modes, state_dict / load_state_dict, replace_param and repr.
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "nn_internal.h"

/* ---- types ---------------------------------------------------------------- */

enum { ENT_PARAM = 1, ENT_BUFFER = 2, ENT_MODULE = 4 };
#define ENT_TENSOR (ENT_PARAM | ENT_BUFFER)

typedef struct entry {
  int kind;
  void *ptr; /* sbn_tensor* or sbn_module*, one reference */
} entry;

typedef struct attr {
  char *name;
  int is_list;
  size_t n, cap;
  entry *items;
} attr;

struct sbn_hook {
  int refs;      /* the handle's and the module's (while registered) */
  sbn_module *m; /* NULL once removed or the module is gone */
  int pre;
  sbn_forward_pre_hook pre_fn;
  sbn_forward_hook post_fn;
  void *ud;
};

typedef struct hook_list {
  sbn_hook **v;
  size_t n, cap;
} hook_list;

struct sbn_module {
  atomic_long refs;
  const sbn_module_vtable *vt;
  void *impl;
  attr *attrs; /* insertion order */
  size_t nattrs, cap;
  int training;
  int quantize_disabled;
  hook_list pre, post;
  unsigned long zero_stamp; /* the sbn_module_zero_grad() call that last saw it */
};

/* ---- small helpers -------------------------------------------------------- */

void sbn__strbuf_add(sbn__strbuf *b, const char *s, size_t n) {
  if (b->failed) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->s, cap);
    if (!p) {
      b->failed = 1;
      return;
    }
    b->s = p;
    b->cap = cap;
  }
  memcpy(b->s + b->len, s, n);
  b->len += n;
  b->s[b->len] = '\0';
}

void sbn__strbuf_printf(sbn__strbuf *b, const char *fmt, ...) {
  char small[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof(small), fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n < sizeof(small)) {
    sbn__strbuf_add(b, small, (size_t)n);
    return;
  }
  char *big = malloc((size_t)n + 1);
  if (!big) {
    b->failed = 1;
    return;
  }
  va_start(ap, fmt);
  vsnprintf(big, (size_t)n + 1, fmt, ap);
  va_end(ap);
  sbn__strbuf_add(b, big, (size_t)n);
  free(big);
}

SBN_API void sbn_free(void *p) { free(p); }

/* A set of pointers (open addressing) for "visited once" traversals. */
typedef struct ptrset {
  const void **slot;
  size_t cap, n;
} ptrset;

static size_t ptr_hash(const void *p) {
  uint64_t x = (uint64_t)(uintptr_t)p;
  x ^= x >> 33;
  x *= UINT64_C(0xff51afd7ed558ccd);
  x ^= x >> 33;
  return (size_t)x;
}

/* Returns 1 if p was added, 0 if already present, -1 when out of memory. */
static int ptrset_add(ptrset *s, const void *p) {
  if ((s->n + 1) * 2 > s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 32;
    const void **slot = calloc(cap, sizeof(*slot));
    if (!slot) return -1;
    for (size_t i = 0; i < s->cap; i++) {
      if (!s->slot[i]) continue;
      size_t j = ptr_hash(s->slot[i]) & (cap - 1);
      while (slot[j]) j = (j + 1) & (cap - 1);
      slot[j] = s->slot[i];
    }
    free(s->slot);
    s->slot = slot;
    s->cap = cap;
  }
  size_t j = ptr_hash(p) & (s->cap - 1);
  while (s->slot[j]) {
    if (s->slot[j] == p) return 0;
    j = (j + 1) & (s->cap - 1);
  }
  s->slot[j] = p;
  s->n++;
  return 1;
}

static void ptrset_free(ptrset *s) {
  free(s->slot);
  s->slot = NULL;
  s->cap = s->n = 0;
}

static void entry_unref(entry *e) {
  if (e->kind == ENT_MODULE)
    sbn_module_free(e->ptr);
  else
    sbn_tensor_free(e->ptr);
  e->ptr = NULL;
}

static int cmp_attr_ptr(const void *a, const void *b) {
  const attr *x = *(const attr *const *)a, *y = *(const attr *const *)b;
  return strcmp(x->name, y->name);
}

/* m's attributes sorted by name; *out is malloc'ed (NULL when none). */
static int sorted_attrs(const sbn_module *m, attr ***out) {
  *out = NULL;
  if (!m->nattrs) return SBN_OK;
  attr **v = malloc(m->nattrs * sizeof(*v));
  if (!v) return sbn__fail(SBN_ENOMEM, "out of memory sorting attributes");
  for (size_t i = 0; i < m->nattrs; i++) v[i] = &m->attrs[i];
  qsort(v, m->nattrs, sizeof(*v), cmp_attr_ptr);
  *out = v;
  return SBN_OK;
}

/* "name" or "name.i" for entry i of attribute a. */
static void entry_key(const attr *a, size_t i, char *buf, size_t len) {
  if (a->is_list)
    snprintf(buf, len, "%s.%zu", a->name, i);
  else
    snprintf(buf, len, "%s", a->name);
}

#define KEY_MAX (SBN_NAME_MAX + 24)

/* prefix + sep + key as a new string. */
static char *join_key(const char *prefix, const char *sep, const char *key) {
  size_t lp = prefix ? strlen(prefix) : 0, ls = prefix ? strlen(sep) : 0, lk = strlen(key);
  char *s = malloc(lp + ls + lk + 1);
  if (!s) return NULL;
  if (lp) memcpy(s, prefix, lp);
  if (ls) memcpy(s + lp, sep, ls);
  memcpy(s + lp + ls, key, lk + 1);
  return s;
}

/* ---- life cycle ------------------------------------------------------------ */

SBN_API int sbn_module_new(const sbn_module_vtable *vt, void *impl, sbn_module **out) {
  if (!out) return sbn__fail(SBN_EINVAL, "module output pointer is NULL");
  if (!vt) return sbn__fail(SBN_EINVAL, "module vtable is NULL");
  if (!vt->type_name || !vt->type_name[0] || !vt->forward) {
    if (vt->destroy) vt->destroy(impl);
    return sbn__fail(SBN_EINVAL, "module vtable needs a type_name and a forward");
  }
  sbn_module *m = calloc(1, sizeof(*m));
  if (!m) {
    if (vt->destroy) vt->destroy(impl);
    return sbn__fail(SBN_ENOMEM, "out of memory allocating a module");
  }
  atomic_init(&m->refs, 1);
  m->vt = vt;
  m->impl = impl;
  m->training = 1;
  *out = m;
  return SBN_OK;
}

SBN_API sbn_module *sbn_module_ref(sbn_module *m) {
  if (m) atomic_fetch_add(&m->refs, 1);
  return m;
}

static void hook_unref(sbn_hook *h) {
  if (h && --h->refs == 0) free(h);
}

static void hooks_detach(hook_list *l) {
  for (size_t i = 0; i < l->n; i++) {
    l->v[i]->m = NULL;
    hook_unref(l->v[i]);
  }
  free(l->v);
  l->v = NULL;
  l->n = l->cap = 0;
}

SBN_API void sbn_module_free(sbn_module *m) {
  if (!m) return;
  if (atomic_fetch_sub(&m->refs, 1) != 1) return;
  if (m->vt->destroy) m->vt->destroy(m->impl);
  for (size_t i = 0; i < m->nattrs; i++) {
    for (size_t j = 0; j < m->attrs[i].n; j++) entry_unref(&m->attrs[i].items[j]);
    free(m->attrs[i].items);
    free(m->attrs[i].name);
  }
  free(m->attrs);
  hooks_detach(&m->pre);
  hooks_detach(&m->post);
  free(m);
}

SBN_API void *sbn_module_impl(const sbn_module *m) { return m ? m->impl : NULL; }
SBN_API const sbn_module_vtable *sbn_module_vtable_of(const sbn_module *m) {
  return m ? m->vt : NULL;
}
SBN_API const char *sbn_module_type_name(const sbn_module *m) {
  return m ? m->vt->type_name : NULL;
}
void sbn__module_set_vtable(sbn_module *m, const sbn_module_vtable *vt) { m->vt = vt; }

/* ---- attributes ------------------------------------------------------------ */

static int check_name(const sbn_module *m, const char *name) {
  if (!m) return sbn__fail(SBN_EINVAL, "module is NULL");
  if (!name || !name[0]) return sbn__fail(SBN_EINVAL, "attribute name is empty");
  if (strlen(name) >= SBN_NAME_MAX)
    return sbn__fail(SBN_EINVAL, "attribute name '%.32s...' is longer than %d bytes", name,
                     SBN_NAME_MAX - 1);
  if (strchr(name, '.'))
    return sbn__fail(SBN_EINVAL, "attribute name '%s' contains a '.'", name);
  return SBN_OK;
}

static attr *find_attr(const sbn_module *m, const char *name) {
  for (size_t i = 0; i < m->nattrs; i++)
    if (strcmp(m->attrs[i].name, name) == 0) return &m->attrs[i];
  return NULL;
}

/* True when target is m or reachable from m. */
static int reaches(const sbn_module *m, const sbn_module *target, ptrset *seen) {
  if (m == target) return 1;
  if (ptrset_add(seen, m) == 0) return 0;
  for (size_t i = 0; i < m->nattrs; i++)
    for (size_t j = 0; j < m->attrs[i].n; j++)
      if (m->attrs[i].items[j].kind == ENT_MODULE &&
          reaches(m->attrs[i].items[j].ptr, target, seen))
        return 1;
  return 0;
}

static int check_value(sbn_module *m, const char *name, int kind, void *ptr) {
  if (kind == ENT_BUFFER && sbn_tensor_is_parameter(ptr))
    return sbn__fail(SBN_EINVAL, "tensor for buffer '%s' is already a parameter", name);
  if (kind == ENT_PARAM) {
    int rc = sbn_tensor_require_grad(ptr);
    if (rc != SBN_OK) return rc;
  }
  if (kind == ENT_MODULE) {
    ptrset seen = {0};
    int cyc = reaches(ptr, m, &seen);
    ptrset_free(&seen);
    if (cyc)
      return sbn__fail(SBN_EINVAL, "setting '%s' would make module '%s' contain itself", name,
                       m->vt->type_name);
  }
  return SBN_OK;
}

static void ref_value(int kind, void *ptr) {
  if (kind == ENT_MODULE)
    sbn_module_ref(ptr);
  else {
    if (kind == ENT_PARAM) sbn__tensor_mark_parameter(ptr);
    sbn_tensor_ref(ptr);
  }
}

static void remove_attr(sbn_module *m, attr *a) {
  for (size_t j = 0; j < a->n; j++) entry_unref(&a->items[j]);
  free(a->items);
  free(a->name);
  size_t i = (size_t)(a - m->attrs);
  memmove(&m->attrs[i], &m->attrs[i + 1], (m->nattrs - i - 1) * sizeof(attr));
  m->nattrs--;
}

static attr *add_attr(sbn_module *m, const char *name, int is_list) {
  if (m->nattrs == m->cap) {
    size_t cap = m->cap ? m->cap * 2 : 8;
    attr *v = realloc(m->attrs, cap * sizeof(*v));
    if (!v) return NULL;
    m->attrs = v;
    m->cap = cap;
  }
  attr *a = &m->attrs[m->nattrs];
  memset(a, 0, sizeof(*a));
  a->name = strdup(name);
  if (!a->name) return NULL;
  a->is_list = is_list;
  m->nattrs++;
  return a;
}

static int set_attr(sbn_module *m, const char *name, int kind, void *ptr) {
  int rc = check_name(m, name);
  if (rc != SBN_OK) return rc;
  attr *a = find_attr(m, name);
  if (!ptr) {
    if (a) remove_attr(m, a);
    return SBN_OK;
  }
  if ((rc = check_value(m, name, kind, ptr)) != SBN_OK) return rc;
  if (a) {
    /* Re-assignment keeps the attribute's place (repr order). */
    entry *items = a->n >= 1 ? a->items : malloc(sizeof(entry));
    if (!items) return sbn__fail(SBN_ENOMEM, "out of memory setting '%s'", name);
    ref_value(kind, ptr);
    for (size_t j = 0; j < a->n; j++) entry_unref(&a->items[j]);
    a->items = items;
    a->cap = a->cap ? a->cap : 1;
    a->items[0].kind = kind;
    a->items[0].ptr = ptr;
    a->n = 1;
    a->is_list = 0;
    return SBN_OK;
  }
  entry *items = malloc(sizeof(entry));
  if (!items) return sbn__fail(SBN_ENOMEM, "out of memory setting '%s'", name);
  a = add_attr(m, name, 0);
  if (!a) {
    free(items);
    return sbn__fail(SBN_ENOMEM, "out of memory setting '%s'", name);
  }
  ref_value(kind, ptr);
  a->items = items;
  a->cap = a->n = 1;
  a->items[0].kind = kind;
  a->items[0].ptr = ptr;
  return SBN_OK;
}

static int append_attr(sbn_module *m, const char *name, int kind, void *ptr) {
  int rc = check_name(m, name);
  if (rc != SBN_OK) return rc;
  if (!ptr) return sbn__fail(SBN_EINVAL, "value appended to '%s' is NULL", name);
  attr *a = find_attr(m, name);
  if (a && !a->is_list)
    return sbn__fail(SBN_EINVAL, "attribute '%s' is not a list", name);
  if ((rc = check_value(m, name, kind, ptr)) != SBN_OK) return rc;
  if (!a && !(a = add_attr(m, name, 1)))
    return sbn__fail(SBN_ENOMEM, "out of memory appending to '%s'", name);
  if (a->n == a->cap) {
    size_t cap = a->cap ? a->cap * 2 : 4;
    entry *v = realloc(a->items, cap * sizeof(*v));
    if (!v) return sbn__fail(SBN_ENOMEM, "out of memory appending to '%s'", name);
    a->items = v;
    a->cap = cap;
  }
  ref_value(kind, ptr);
  a->items[a->n].kind = kind;
  a->items[a->n].ptr = ptr;
  a->n++;
  return SBN_OK;
}

SBN_API int sbn_module_set_parameter(sbn_module *m, const char *name, sbn_tensor *t) {
  return set_attr(m, name, ENT_PARAM, t);
}
SBN_API int sbn_module_set_buffer(sbn_module *m, const char *name, sbn_tensor *t) {
  return set_attr(m, name, ENT_BUFFER, t);
}
SBN_API int sbn_module_set_module(sbn_module *m, const char *name, sbn_module *child) {
  return set_attr(m, name, ENT_MODULE, child);
}
SBN_API int sbn_module_append_parameter(sbn_module *m, const char *name, sbn_tensor *t) {
  return append_attr(m, name, ENT_PARAM, t);
}
SBN_API int sbn_module_append_buffer(sbn_module *m, const char *name, sbn_tensor *t) {
  return append_attr(m, name, ENT_BUFFER, t);
}
SBN_API int sbn_module_append_module(sbn_module *m, const char *name, sbn_module *child) {
  return append_attr(m, name, ENT_MODULE, child);
}

sbn_tensor *sbn__module_attr_tensor(const sbn_module *m, const char *name) {
  const attr *a = find_attr(m, name);
  if (!a || a->is_list || a->n != 1 || !(a->items[0].kind & ENT_TENSOR)) return NULL;
  return a->items[0].ptr;
}

/* Resolves one dotted path component (and a list index after it). */
static const entry *resolve(const sbn_module *m, const char *path) {
  char part[SBN_NAME_MAX];
  const entry *e = NULL;
  while (m && *path) {
    const char *dot = strchr(path, '.');
    size_t len = dot ? (size_t)(dot - path) : strlen(path);
    if (len == 0 || len >= sizeof(part)) return NULL;
    memcpy(part, path, len);
    part[len] = '\0';
    path += len + (dot ? 1 : 0);
    const attr *a = find_attr(m, part);
    if (!a) return NULL;
    if (a->is_list) {
      char *end;
      const char *idx = path;
      dot = strchr(idx, '.');
      unsigned long i = strtoul(idx, &end, 10);
      if (end == idx || (dot ? end != dot : *end != '\0') || i >= a->n) return NULL;
      e = &a->items[i];
      path = dot ? dot + 1 : end;
    } else {
      e = &a->items[0];
    }
    if (*path && e->kind != ENT_MODULE) return NULL;
    m = e->kind == ENT_MODULE ? e->ptr : NULL;
  }
  return *path ? NULL : e;
}

SBN_API sbn_module *sbn_module_get_module(const sbn_module *m, const char *path) {
  if (!m || !path) return NULL;
  const entry *e = resolve(m, path);
  return e && e->kind == ENT_MODULE ? e->ptr : NULL;
}

SBN_API sbn_tensor *sbn_module_get_tensor(const sbn_module *m, const char *path) {
  if (!m || !path) return NULL;
  const entry *e = resolve(m, path);
  return e && (e->kind & ENT_TENSOR) ? e->ptr : NULL;
}

/* ---- traversal ------------------------------------------------------------- */

SBN_API void sbn_named_list_release(sbn_named_list *l) {
  if (!l) return;
  for (size_t i = 0; i < l->count; i++) {
    free(l->names[i]);
    if (l->kind == SBN_LIST_MODULES)
      sbn_module_free(l->items[i]);
    else
      sbn_tensor_free(l->items[i]);
  }
  free(l->names);
  free(l->items);
  free(l->parents);
  memset(l, 0, sizeof(*l));
}

typedef struct list_builder {
  sbn_named_list l;
  size_t cap;
} list_builder;

/* Takes ownership of name (freed on failure). */
static int list_push(list_builder *b, char *name, void *item, sbn_module *parent) {
  if (!name) return sbn__fail(SBN_ENOMEM, "out of memory building a key");
  if (b->l.count == b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 16;
    char **names = realloc(b->l.names, cap * sizeof(*names));
    if (names) b->l.names = names;
    void **items = realloc(b->l.items, cap * sizeof(*items));
    if (items) b->l.items = items;
    sbn_module **parents = realloc(b->l.parents, cap * sizeof(*parents));
    if (parents) b->l.parents = parents;
    if (!names || !items || !parents) {
      free(name);
      return sbn__fail(SBN_ENOMEM, "out of memory listing modules");
    }
    b->cap = cap;
  }
  b->l.names[b->l.count] = name;
  b->l.items[b->l.count] = item;
  b->l.parents[b->l.count] = parent;
  if (b->l.kind == SBN_LIST_MODULES)
    sbn_module_ref(item);
  else
    sbn_tensor_ref(item);
  b->l.count++;
  return SBN_OK;
}

typedef struct walk {
  ptrset seen;
  list_builder b;
  int want; /* ENT_* bits to list */
  int recursive;
} walk;

static int flatten(walk *w, sbn_module *m, const char *prefix) {
  attr **order;
  int rc = sorted_attrs(m, &order);
  if (rc != SBN_OK) return rc;
  for (size_t i = 0; i < m->nattrs && rc == SBN_OK; i++) {
    const attr *a = order[i];
    for (size_t j = 0; j < a->n && rc == SBN_OK; j++) {
      const entry *e = &a->items[j];
      int added = ptrset_add(&w->seen, e->ptr);
      if (added < 0) rc = sbn__fail(SBN_ENOMEM, "out of memory walking modules");
      if (added <= 0) continue;
      char key[KEY_MAX];
      entry_key(a, j, key, sizeof(key));
      char *full = join_key(prefix, ".", key);
      if (!full) {
        rc = sbn__fail(SBN_ENOMEM, "out of memory building a key");
        break;
      }
      if (e->kind & w->want) {
        char *name = strdup(full);
        rc = list_push(&w->b, name, e->ptr, m);
      }
      if (rc == SBN_OK && w->recursive && e->kind == ENT_MODULE)
        rc = flatten(w, e->ptr, full);
      free(full);
    }
  }
  free(order);
  return rc;
}

static int run_walk(sbn_module *m, const char *prefix, int recursive, int want, int with_self,
                    sbn_named_list *out) {
  if (!out) return sbn__fail(SBN_EINVAL, "list output pointer is NULL");
  if (!m) return sbn__fail(SBN_EINVAL, "module is NULL");
  walk w;
  memset(&w, 0, sizeof(w));
  w.want = want;
  w.recursive = recursive;
  w.b.l.kind = want == ENT_MODULE ? SBN_LIST_MODULES : SBN_LIST_TENSORS;
  int rc = ptrset_add(&w.seen, m) < 0 ? sbn__fail(SBN_ENOMEM, "out of memory walking modules")
                                      : SBN_OK;
  if (rc == SBN_OK && with_self) rc = list_push(&w.b, strdup(prefix ? prefix : ""), m, NULL);
  if (rc == SBN_OK) rc = flatten(&w, m, prefix);
  ptrset_free(&w.seen);
  if (rc != SBN_OK) {
    sbn_named_list_release(&w.b.l);
    return rc;
  }
  *out = w.b.l;
  return SBN_OK;
}

SBN_API int sbn_module_named_parameters(sbn_module *m, const char *prefix, int recursive,
                                        sbn_named_list *out) {
  return run_walk(m, prefix, recursive, ENT_PARAM, 0, out);
}
SBN_API int sbn_module_named_buffers(sbn_module *m, const char *prefix, int recursive,
                                     sbn_named_list *out) {
  return run_walk(m, prefix, recursive, ENT_BUFFER, 0, out);
}
SBN_API int sbn_module_named_tensors(sbn_module *m, const char *prefix, int recursive,
                                     sbn_named_list *out) {
  return run_walk(m, prefix, recursive, ENT_TENSOR, 0, out);
}
SBN_API int sbn_module_named_children(sbn_module *m, sbn_named_list *out) {
  return run_walk(m, NULL, 0, ENT_MODULE, 0, out);
}
SBN_API int sbn_module_named_modules(sbn_module *m, const char *prefix, sbn_named_list *out) {
  return run_walk(m, prefix, 1, ENT_MODULE, 1, out);
}
SBN_API int sbn_module_parameters(sbn_module *m, int recursive, sbn_named_list *out) {
  return run_walk(m, NULL, recursive, ENT_PARAM, 0, out);
}
SBN_API int sbn_module_buffers(sbn_module *m, int recursive, sbn_named_list *out) {
  return run_walk(m, NULL, recursive, ENT_BUFFER, 0, out);
}
SBN_API int sbn_module_tensors(sbn_module *m, int recursive, sbn_named_list *out) {
  return run_walk(m, NULL, recursive, ENT_TENSOR, 0, out);
}
SBN_API int sbn_module_children(sbn_module *m, sbn_named_list *out) {
  return run_walk(m, NULL, 0, ENT_MODULE, 0, out);
}
SBN_API int sbn_module_modules(sbn_module *m, sbn_named_list *out) {
  return run_walk(m, NULL, 1, ENT_MODULE, 1, out);
}

SBN_API int sbn_module_apply(sbn_module *m, sbn_module_fn fn, void *ud) {
  if (!fn) return sbn__fail(SBN_EINVAL, "apply function is NULL");
  sbn_named_list l = {0};
  int rc = sbn_module_modules(m, &l);
  for (size_t i = 0; rc == SBN_OK && i < l.count; i++) rc = fn(l.items[i], ud);
  sbn_named_list_release(&l);
  return rc;
}

/* Calls fn on m and every submodule once, pre-order. */
static int visit(sbn_module *m, ptrset *seen, void (*fn)(sbn_module *, void *), void *ud) {
  int added = ptrset_add(seen, m);
  if (added < 0) return sbn__fail(SBN_ENOMEM, "out of memory walking modules");
  if (added == 0) return SBN_OK;
  fn(m, ud);
  attr **order;
  int rc = sorted_attrs(m, &order);
  for (size_t i = 0; rc == SBN_OK && i < m->nattrs; i++)
    for (size_t j = 0; rc == SBN_OK && j < order[i]->n; j++)
      if (order[i]->items[j].kind == ENT_MODULE) rc = visit(order[i]->items[j].ptr, seen, fn, ud);
  free(order);
  return rc;
}

static int visit_all(sbn_module *m, void (*fn)(sbn_module *, void *), void *ud) {
  if (!m) return sbn__fail(SBN_EINVAL, "module is NULL");
  ptrset seen = {0};
  int rc = visit(m, &seen, fn, ud);
  ptrset_free(&seen);
  return rc;
}

/* ---- modes ----------------------------------------------------------------- */

static void set_training(sbn_module *m, void *ud) { m->training = *(int *)ud; }
static void set_quantize(sbn_module *m, void *ud) { m->quantize_disabled = *(int *)ud; }

SBN_API int sbn_module_train(sbn_module *m, int mode, int recursive) {
  mode = !!mode;
  if (!m) return sbn__fail(SBN_EINVAL, "module is NULL");
  if (!recursive) {
    m->training = mode;
    return SBN_OK;
  }
  return visit_all(m, set_training, &mode);
}

SBN_API int sbn_module_eval(sbn_module *m) { return sbn_module_train(m, 0, 1); }
SBN_API int sbn_module_is_training(const sbn_module *m) { return m ? m->training : 0; }

SBN_API int sbn_module_disable_quantize(sbn_module *m, int value) {
  value = !!value;
  return visit_all(m, set_quantize, &value);
}

SBN_API int sbn_module_quantize_disabled(const sbn_module *m) {
  return m ? m->quantize_disabled : 0;
}

/* ---- computation ----------------------------------------------------------- */

SBN_API int sbn_module_forward(sbn_module *m, sbn_tensor *input, sbn_tensor **out) {
  if (!m || !input || !out) return sbn__fail(SBN_EINVAL, "forward with a NULL argument");
  sbn_tensor *y = NULL;
  int rc = m->vt->forward(m, input, &y);
  if (rc != SBN_OK) {
    sbn_tensor_free(y);
    return rc;
  }
  if (!y) return sbn__fail(SBN_ESTATE, "forward of '%s' returned no output", m->vt->type_name);
  *out = y;
  return SBN_OK;
}

SBN_API int sbn_module_backward(sbn_module *m, sbn_tensor *dy, sbn_tensor **dx) {
  if (!m || !dy || !dx) return sbn__fail(SBN_EINVAL, "backward with a NULL argument");
  if (!m->vt->backward)
    return sbn__fail(SBN_ESTATE, "module '%s' has no backward", m->vt->type_name);
  sbn_tensor *g = NULL;
  int rc = m->vt->backward(m, dy, &g);
  if (rc != SBN_OK) {
    sbn_tensor_free(g);
    return rc;
  }
  if (!g) return sbn__fail(SBN_ESTATE, "backward of '%s' returned no gradient", m->vt->type_name);
  *dx = g;
  return SBN_OK;
}

/* A copy of a hook list with a reference on each, so that hooks may remove
 * themselves (or others) while the list runs. */
static int hooks_snapshot(const hook_list *l, sbn_hook ***out) {
  *out = NULL;
  if (!l->n) return SBN_OK;
  sbn_hook **v = malloc(l->n * sizeof(*v));
  if (!v) return sbn__fail(SBN_ENOMEM, "out of memory running hooks");
  for (size_t i = 0; i < l->n; i++) {
    v[i] = l->v[i];
    v[i]->refs++;
  }
  *out = v;
  return SBN_OK;
}

static void hooks_snapshot_free(sbn_hook **v, size_t n) {
  for (size_t i = 0; i < n; i++) hook_unref(v[i]);
  free(v);
}

SBN_API int sbn_module_call(sbn_module *m, sbn_tensor *input, sbn_tensor **out) {
  if (!m || !input || !out) return sbn__fail(SBN_EINVAL, "call with a NULL argument");
  sbn_tensor *in = sbn_tensor_ref(input), *y = NULL;
  sbn_hook **snap;
  size_t n = m->pre.n;
  int rc = hooks_snapshot(&m->pre, &snap);
  for (size_t i = 0; rc == SBN_OK && i < n; i++) {
    if (snap[i]->m != m) continue; /* removed meanwhile */
    rc = snap[i]->pre_fn(m, &in, snap[i]->ud);
    if (rc == SBN_OK && !in)
      rc = sbn__fail(SBN_ESTATE, "a forward pre-hook of '%s' left no input", m->vt->type_name);
  }
  hooks_snapshot_free(snap, n);
  if (rc == SBN_OK) rc = sbn_module_forward(m, in, &y);
  n = m->post.n;
  if (rc == SBN_OK) {
    rc = hooks_snapshot(&m->post, &snap);
    for (size_t i = 0; rc == SBN_OK && i < n; i++) {
      if (snap[i]->m != m) continue;
      rc = snap[i]->post_fn(m, in, &y, snap[i]->ud);
      if (rc == SBN_OK && !y)
        rc = sbn__fail(SBN_ESTATE, "a forward hook of '%s' left no output", m->vt->type_name);
    }
    hooks_snapshot_free(snap, n);
  }
  sbn_tensor_free(in);
  if (rc != SBN_OK) {
    sbn_tensor_free(y);
    return rc;
  }
  *out = y;
  return SBN_OK;
}

static int add_hook(sbn_module *m, hook_list *l, sbn_hook *h, sbn_hook **handle) {
  if (l->n == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 4;
    sbn_hook **v = realloc(l->v, cap * sizeof(*v));
    if (!v) {
      free(h);
      return sbn__fail(SBN_ENOMEM, "out of memory registering a hook");
    }
    l->v = v;
    l->cap = cap;
  }
  h->m = m;
  h->refs = 2;
  l->v[l->n++] = h;
  *handle = h;
  return SBN_OK;
}

SBN_API int sbn_module_register_forward_pre_hook(sbn_module *m, sbn_forward_pre_hook fn,
                                                 void *ud, sbn_hook **handle) {
  if (!m || !fn || !handle) return sbn__fail(SBN_EINVAL, "hook registration with a NULL argument");
  sbn_hook *h = calloc(1, sizeof(*h));
  if (!h) return sbn__fail(SBN_ENOMEM, "out of memory registering a hook");
  h->pre = 1;
  h->pre_fn = fn;
  h->ud = ud;
  return add_hook(m, &m->pre, h, handle);
}

SBN_API int sbn_module_register_forward_hook(sbn_module *m, sbn_forward_hook fn, void *ud,
                                             sbn_hook **handle) {
  if (!m || !fn || !handle) return sbn__fail(SBN_EINVAL, "hook registration with a NULL argument");
  sbn_hook *h = calloc(1, sizeof(*h));
  if (!h) return sbn__fail(SBN_ENOMEM, "out of memory registering a hook");
  h->post_fn = fn;
  h->ud = ud;
  return add_hook(m, &m->post, h, handle);
}

SBN_API void sbn_hook_remove(sbn_hook *h) {
  if (!h || !h->m) return;
  hook_list *l = h->pre ? &h->m->pre : &h->m->post;
  for (size_t i = 0; i < l->n; i++) {
    if (l->v[i] != h) continue;
    memmove(&l->v[i], &l->v[i + 1], (l->n - i - 1) * sizeof(*l->v));
    l->n--;
    break;
  }
  h->m = NULL;
  hook_unref(h);
}

SBN_API void sbn_hook_free(sbn_hook *h) { hook_unref(h); }

/* ---- parameters ------------------------------------------------------------ */

/* Zeroing twice is harmless, so no set of seen tensors (and no allocation,
 * so no failure): a module shared in several places is skipped by its stamp
 * after the first, tensors shared between modules are zeroed again. */
static void zero_grad_walk(sbn_module *m, unsigned long stamp) {
  if (m->zero_stamp == stamp) return;
  m->zero_stamp = stamp;
  for (size_t i = 0; i < m->nattrs; i++)
    for (size_t j = 0; j < m->attrs[i].n; j++) {
      const entry *e = &m->attrs[i].items[j];
      if (e->kind == ENT_PARAM)
        sbn_tensor_fill(sbn_tensor_grad(e->ptr), 0.0f);
      else if (e->kind == ENT_MODULE)
        zero_grad_walk(e->ptr, stamp);
    }
}

SBN_API int sbn_module_zero_grad(sbn_module *m) {
  static atomic_ulong stamps;
  if (!m) return sbn__fail(SBN_EINVAL, "module is NULL");
  zero_grad_walk(m, atomic_fetch_add(&stamps, 1) + 1);
  return SBN_OK;
}

static int reset_with(sbn_module *m, int params) {
  sbn_named_list l = {0};
  int rc = sbn_module_modules(m, &l);
  for (size_t i = 0; rc == SBN_OK && i < l.count; i++) {
    sbn_module *x = l.items[i];
    int (*fn)(sbn_module *) = params ? x->vt->reset_parameters : x->vt->reset_running_stats;
    if (fn) rc = fn(x);
  }
  sbn_named_list_release(&l);
  return rc;
}

SBN_API int sbn_module_reset_parameters(sbn_module *m) { return reset_with(m, 1); }
SBN_API int sbn_module_reset_running_stats(sbn_module *m) { return reset_with(m, 0); }

/* Walks like MegEngine's replace_param: own plain attributes, sorted, the
 * seen set shared through the recursion.  apply = 0 only checks. */
static int replace_walk(sbn_module *m, sbn_tensor *const *params, size_t n, size_t start,
                        ptrset *seen, int apply, size_t *count) {
  attr **order;
  size_t offset = 0;
  int rc = sorted_attrs(m, &order);
  for (size_t i = 0; rc == SBN_OK && i < m->nattrs; i++) {
    attr *a = order[i];
    if (a->is_list) continue;
    entry *e = &a->items[0];
    int added = ptrset_add(seen, e->ptr);
    if (added < 0) rc = sbn__fail(SBN_ENOMEM, "out of memory walking modules");
    if (added <= 0) continue;
    if (e->kind == ENT_MODULE) {
      size_t sub = 0;
      rc = replace_walk(e->ptr, params, n, start + offset, seen, apply, &sub);
      offset += sub;
      continue;
    }
    if (!sbn_tensor_is_parameter(e->ptr)) continue;
    size_t idx = start + offset++;
    if (idx >= n || !params[idx]) continue;
    if (!apply) {
      if (!sbn_tensor_same_shape(params[idx], e->ptr)) {
        char x[96], y[96];
        rc = sbn__fail(SBN_ESHAPE, "parameter %zu ('%s') has shape %s, replacement has %s", idx,
                       a->name, sbn_tensor_shape_str(e->ptr, x, sizeof(x)),
                       sbn_tensor_shape_str(params[idx], y, sizeof(y)));
      } else {
        rc = sbn_tensor_require_grad(params[idx]);
      }
    } else {
      sbn__tensor_mark_parameter(params[idx]);
      sbn_tensor_ref(params[idx]);
      sbn_tensor_free(e->ptr);
      e->ptr = params[idx];
    }
  }
  free(order);
  *count = offset;
  return rc;
}

SBN_API int sbn_module_replace_param(sbn_module *m, sbn_tensor *const *params, size_t n,
                                     size_t start_pos, size_t *visited) {
  if (!m || (n && !params)) return sbn__fail(SBN_EINVAL, "replace_param with a NULL argument");
  size_t count = 0;
  for (int apply = 0; apply < 2; apply++) {
    ptrset seen = {0};
    int rc = ptrset_add(&seen, m) < 0 ? sbn__fail(SBN_ENOMEM, "out of memory walking modules")
                                      : replace_walk(m, params, n, start_pos, &seen, apply, &count);
    ptrset_free(&seen);
    if (rc != SBN_OK) return rc; /* the check pass failed: nothing changed */
  }
  if (visited) *visited = count;
  return SBN_OK;
}

/* ---- state dicts ----------------------------------------------------------- */

SBN_API void sbn_state_dict_init(sbn_state_dict *sd) {
  if (sd) memset(sd, 0, sizeof(*sd));
}

SBN_API void sbn_state_dict_release(sbn_state_dict *sd) {
  if (!sd) return;
  for (size_t i = 0; i < sd->count; i++) {
    free(sd->keys[i]);
    sbn_tensor_free(sd->values[i]);
  }
  free(sd->keys);
  free(sd->values);
  memset(sd, 0, sizeof(*sd));
}

static long sd_find(const sbn_state_dict *sd, const char *key) {
  for (size_t i = 0; i < sd->count; i++)
    if (strcmp(sd->keys[i], key) == 0) return (long)i;
  return -1;
}

/* Appends without looking for the key; takes ownership of key, a new
 * reference to t. */
static int sd_append(sbn_state_dict *sd, char *key, sbn_tensor *t) {
  if (!key) return sbn__fail(SBN_ENOMEM, "out of memory building a key");
  if (sd->count == sd->cap) {
    size_t cap = sd->cap ? sd->cap * 2 : 16;
    char **k = realloc(sd->keys, cap * sizeof(*k));
    if (k) sd->keys = k;
    sbn_tensor **v = realloc(sd->values, cap * sizeof(*v));
    if (v) sd->values = v;
    if (!k || !v) {
      free(key);
      return sbn__fail(SBN_ENOMEM, "out of memory growing a state dict");
    }
    sd->cap = cap;
  }
  sd->keys[sd->count] = key;
  sd->values[sd->count] = sbn_tensor_ref(t);
  sd->count++;
  return SBN_OK;
}

SBN_API int sbn_state_dict_set(sbn_state_dict *sd, const char *key, sbn_tensor *t) {
  if (!sd || !key || !t) return sbn__fail(SBN_EINVAL, "state dict set with a NULL argument");
  long i = sd_find(sd, key);
  if (i >= 0) {
    sbn_tensor_ref(t);
    sbn_tensor_free(sd->values[i]);
    sd->values[i] = t;
    return SBN_OK;
  }
  return sd_append(sd, strdup(key), t);
}

SBN_API sbn_tensor *sbn_state_dict_get(const sbn_state_dict *sd, const char *key) {
  if (!sd || !key) return NULL;
  long i = sd_find(sd, key);
  return i >= 0 ? sd->values[i] : NULL;
}

SBN_API int sbn_state_dict_remove(sbn_state_dict *sd, const char *key) {
  if (!sd || !key) return sbn__fail(SBN_EINVAL, "state dict remove with a NULL argument");
  long i = sd_find(sd, key);
  if (i < 0) return sbn__fail(SBN_EKEY, "no key '%s' in the state dict", key);
  free(sd->keys[i]);
  sbn_tensor_free(sd->values[i]);
  memmove(&sd->keys[i], &sd->keys[i + 1], (sd->count - (size_t)i - 1) * sizeof(char *));
  memmove(&sd->values[i], &sd->values[i + 1], (sd->count - (size_t)i - 1) * sizeof(sbn_tensor *));
  sd->count--;
  return SBN_OK;
}

/* The module's state entries (references) with the module owning each. */
typedef struct state_list {
  sbn_state_dict sd;
  sbn_module **owners;
  size_t owners_cap;
} state_list;

static int state_push(state_list *sl, char *key, sbn_tensor *t, sbn_module *owner) {
  if (sl->sd.count == sl->owners_cap) {
    size_t cap = sl->owners_cap ? sl->owners_cap * 2 : 16;
    sbn_module **o = realloc(sl->owners, cap * sizeof(*o));
    if (!o) {
      free(key);
      return sbn__fail(SBN_ENOMEM, "out of memory building a state dict");
    }
    sl->owners = o;
    sl->owners_cap = cap;
  }
  sl->owners[sl->sd.count] = owner;
  return sd_append(&sl->sd, key, t);
}

static int state_rec(sbn_module *m, const char *prefix, state_list *sl) {
  attr **order;
  int rc = sorted_attrs(m, &order);
  ptrset seen = {0};
  /* Own tensors first, then submodules; each deduplicated within m only. */
  for (int pass = 0; pass < 2 && rc == SBN_OK; pass++) {
    for (size_t i = 0; i < m->nattrs && rc == SBN_OK; i++) {
      for (size_t j = 0; j < order[i]->n && rc == SBN_OK; j++) {
        entry *e = &order[i]->items[j];
        if ((pass == 0) != ((e->kind & ENT_TENSOR) != 0)) continue;
        int added = ptrset_add(&seen, e->ptr);
        if (added < 0) rc = sbn__fail(SBN_ENOMEM, "out of memory walking modules");
        if (added <= 0) continue;
        char key[KEY_MAX];
        entry_key(order[i], j, key, sizeof(key));
        char *full = join_key(prefix, "", key);
        if (pass == 0) {
          rc = state_push(sl, full, e->ptr, m);
        } else if (!full) {
          rc = sbn__fail(SBN_ENOMEM, "out of memory building a key");
        } else {
          char *sub = join_key(full, ".", "");
          rc = sub ? state_rec(e->ptr, sub, sl)
                   : sbn__fail(SBN_ENOMEM, "out of memory building a key");
          free(sub);
          free(full);
        }
      }
    }
  }
  ptrset_free(&seen);
  free(order);
  return rc;
}

static void state_list_release(state_list *sl) {
  sbn_state_dict_release(&sl->sd);
  free(sl->owners);
}

static int collect_state(sbn_module *m, const char *prefix, state_list *sl) {
  memset(sl, 0, sizeof(*sl));
  if (!m) return sbn__fail(SBN_EINVAL, "module is NULL");
  int rc = state_rec(m, prefix ? prefix : "", sl);
  if (rc != SBN_OK) state_list_release(sl);
  return rc;
}

SBN_API int sbn_module_state_dict(sbn_module *m, const char *prefix, int keep_var,
                                  sbn_state_dict *out) {
  if (!out) return sbn__fail(SBN_EINVAL, "state dict output pointer is NULL");
  state_list sl;
  int rc = collect_state(m, prefix, &sl);
  if (rc != SBN_OK) return rc;
  free(sl.owners);
  if (!keep_var) {
    for (size_t i = 0; i < sl.sd.count; i++) {
      sbn_tensor *c;
      if ((rc = sbn_tensor_clone(sl.sd.values[i], &c)) != SBN_OK) {
        sbn_state_dict_release(&sl.sd);
        return rc;
      }
      sbn_tensor_free(sl.sd.values[i]);
      sl.sd.values[i] = c;
    }
  }
  *out = sl.sd;
  return SBN_OK;
}

/* Appends "'key'" to a message, stopping (with "...") before it gets long. */
static void msg_key(sbn__strbuf *b, int *first, const char *key) {
  if (b->len > 700) {
    if (*first != 2) sbn__strbuf_add(b, ", ...", 5);
    *first = 2;
    return;
  }
  sbn__strbuf_printf(b, "%s'%s'", *first ? "" : ", ", key);
  *first = 0;
}

static int load_common(sbn_module *m, const sbn_state_dict *dict, sbn_state_loader fn, void *ud,
                       int strict) {
  state_list sl;
  int rc = collect_state(m, NULL, &sl);
  if (rc != SBN_OK) return rc;
  size_t n = sl.sd.count;
  sbn_tensor **vals = calloc(n ? n : 1, sizeof(*vals));
  if (!vals) {
    state_list_release(&sl);
    return sbn__fail(SBN_ENOMEM, "out of memory loading a state dict");
  }
  /* 1. Gather a value for every key. */
  for (size_t i = 0; i < n && rc == SBN_OK; i++) {
    if (dict) {
      vals[i] = sbn_tensor_ref(sbn_state_dict_get(dict, sl.sd.keys[i]));
    } else {
      rc = fn(sl.sd.keys[i], sl.sd.values[i], &vals[i], ud);
    }
  }
  /* 2. Check every shape. */
  for (size_t i = 0; i < n && rc == SBN_OK; i++) {
    sbn_tensor *var = sl.sd.values[i], *v = vals[i];
    if (!v || sbn_tensor_same_shape(v, var)) continue;
    char a[96], b[96];
    if (sl.owners[i]->vt->flags & SBN_MODULE_FLAT_STATE) {
      if (sbn_tensor_numel(v) != sbn_tensor_numel(var))
        rc = sbn__fail(SBN_ESHAPE, "param '%s' size mismatch, should be %zu, got %zu",
                       sl.sd.keys[i], sbn_tensor_numel(var), sbn_tensor_numel(v));
    } else {
      rc = sbn__fail(SBN_ESHAPE, "param '%s' shape mismatch, should be %s, got %s",
                     sl.sd.keys[i], sbn_tensor_shape_str(var, a, sizeof(a)),
                     sbn_tensor_shape_str(v, b, sizeof(b)));
    }
  }
  /* 3. Strict: no unused and no missing keys. */
  if (rc == SBN_OK && strict) {
    sbn__strbuf msg = {0};
    int first = 1, any_unused = 0, any_missing = 0;
    for (size_t k = 0; dict && k < dict->count; k++) {
      if (sd_find(&sl.sd, dict->keys[k]) >= 0) continue;
      if (!any_unused) sbn__strbuf_printf(&msg, "unused keys ");
      any_unused = 1;
      msg_key(&msg, &first, dict->keys[k]);
    }
    first = 1;
    for (size_t i = 0; i < n; i++) {
      if (vals[i]) continue;
      if (!any_missing) sbn__strbuf_printf(&msg, "%smissing keys ", any_unused ? "; " : "");
      any_missing = 1;
      msg_key(&msg, &first, sl.sd.keys[i]);
    }
    if (any_unused || any_missing)
      rc = sbn__fail(SBN_EKEY, "strict load of '%s' failed: %s", m->vt->type_name,
                     msg.s && !msg.failed ? msg.s : "(out of memory)");
    free(msg.s);
  }
  /* 4. Only now change anything (copies cannot fail). */
  for (size_t i = 0; i < n && rc == SBN_OK; i++)
    if (vals[i]) {
      float *dst = sbn_tensor_data(sl.sd.values[i]);
      const float *src = sbn_tensor_cdata(vals[i]);
      size_t cnt = sbn_tensor_numel(vals[i]);
      if (cnt && dst != src) memmove(dst, src, cnt * sizeof(float));
    }
  for (size_t i = 0; i < n; i++) sbn_tensor_free(vals[i]);
  free(vals);
  state_list_release(&sl);
  return rc;
}

SBN_API int sbn_module_load_state_dict(sbn_module *m, const sbn_state_dict *sd, int strict) {
  if (!m || !sd) return sbn__fail(SBN_EINVAL, "load_state_dict with a NULL argument");
  return load_common(m, sd, NULL, NULL, strict);
}

SBN_API int sbn_module_load_state_dict_cb(sbn_module *m, sbn_state_loader fn, void *ud,
                                          int strict) {
  if (!m || !fn) return sbn__fail(SBN_EINVAL, "load_state_dict with a NULL argument");
  return load_common(m, NULL, fn, ud, strict);
}

/* ---- repr ------------------------------------------------------------------ */

/* Adds s with two spaces after each newline (MegEngine's _addindent). */
static void add_indented(sbn__strbuf *b, const char *s) {
  for (const char *p = s; *p; p++) {
    sbn__strbuf_add(b, p, 1);
    if (*p == '\n') sbn__strbuf_add(b, "  ", 2);
  }
}

static void repr_rec(const sbn_module *m, sbn__strbuf *b) {
  sbn__strbuf extra = {0}, body = {0};
  int nlines = 0, nchildren = 0;
  if (m->vt->extra_repr) {
    int need = m->vt->extra_repr(m, NULL, 0);
    if (need > 0) {
      char *s = malloc((size_t)need + 1);
      if (!s) {
        b->failed = 1;
        return;
      }
      m->vt->extra_repr(m, s, (size_t)need + 1);
      sbn__strbuf_add(&extra, s, strlen(s));
      free(s);
    }
  }
  if (extra.len) {
    nlines = 1;
    for (size_t i = 0; i < extra.len; i++) nlines += extra.s[i] == '\n';
    sbn__strbuf_add(&body, "\n  ", 3);
    add_indented(&body, extra.s);
  }
  for (size_t i = 0; i < m->nattrs; i++) {
    const attr *a = &m->attrs[i];
    for (size_t j = 0; j < a->n; j++) {
      if (a->items[j].kind != ENT_MODULE) continue;
      char key[KEY_MAX];
      sbn__strbuf child = {0};
      entry_key(a, j, key, sizeof(key));
      repr_rec(a->items[j].ptr, &child);
      if (child.failed) b->failed = 1;
      sbn__strbuf_printf(&body, "\n  (%s): ", key);
      if (child.s) add_indented(&body, child.s);
      free(child.s);
      nchildren++;
    }
  }
  sbn__strbuf_printf(b, "%s(", m->vt->type_name);
  if (nlines == 1 && nchildren == 0)
    sbn__strbuf_add(b, extra.s, extra.len);
  else if (body.len) {
    sbn__strbuf_add(b, body.s, body.len);
    sbn__strbuf_add(b, "\n", 1);
  }
  sbn__strbuf_add(b, ")", 1);
  if (extra.failed || body.failed) b->failed = 1;
  free(extra.s);
  free(body.s);
}

SBN_API int sbn_module_repr(const sbn_module *m, char **out) {
  if (!m || !out) return sbn__fail(SBN_EINVAL, "repr with a NULL argument");
  sbn__strbuf b = {0};
  repr_rec(m, &b);
  if (b.failed || !b.s) {
    free(b.s);
    return sbn__fail(SBN_ENOMEM, "out of memory building a repr");
  }
  *out = b.s;
  return SBN_OK;
}
