/*
 * sbn/module.h - MegEngine's Module API in C.
 *
 * A module is an opaque, reference-counted object made of
 *   - a vtable (type name, forward, optional backward, extra repr, ...) and a
 *     private impl pointer that the vtable's functions interpret;
 *   - named attributes in insertion order, each holding a parameter, a buffer
 *     or a submodule, or a list of them (a list "layers" expands as
 *     "layers.0", "layers.1", ... in index order);
 *   - a training flag, a quantize_disabled flag and forward hooks.
 * Users write their own modules (a Linear layer, say) by filling a vtable and
 * calling sbn_module_new(); BatchNorm, SyncBatchNorm and Sequential (sbn/nn.h)
 * are built the same way.
 *
 * Traversal (MegEngine's order, which state_dict keys follow): attributes are
 * visited in sorted name order (strcmp, so "10" sorts before "2"), lists in
 * index order, pre-order depth first; a module or tensor reachable twice is
 * visited once, where it is first met.  named_* keys are dotted paths, with
 * "prefix." in front when a prefix is given.
 *
 * Ownership: registering a tensor or a module takes a new reference; the
 * caller keeps its own.  A module may be held by several parents (a shared
 * submodule).  Lists filled by the library (sbn_named_list, sbn_state_dict)
 * hold references too and are freed with their *_release function.  Cycles
 * (a module registered under its own subtree) are refused with SBN_EINVAL.
 *
 * Threading: a module tree is used by one thread at a time.
 *
 * Failure: functions return SBN_OK or a negative SBN_E* code with a message
 * for sbn_last_error(); unless documented otherwise, nothing is changed when
 * a call fails.  Callbacks (hooks, apply, loaders) that return an error stop
 * the operation and their status is returned unchanged.
 */
#ifndef SBN_MODULE_H
#define SBN_MODULE_H

#include <stddef.h>

#include "sbn/status.h"
#include "sbn/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct sbn_module sbn_module;

/* Longest attribute name, in bytes (no '.', not empty). */
#define SBN_NAME_MAX 128

/* vtable flags */
/* The module's tensors load from any shape with the same number of elements
 * (MegEngine's rule for normalization layers). */
#define SBN_MODULE_FLAT_STATE 0x1u

typedef struct sbn_module_vtable {
  /* Class name for repr and errors ("Linear"); required. */
  const char *type_name;
  /*
   * The computation: *out receives a new reference (the library frees the
   * caller's output on a later failure).  Required.
   */
  int (*forward)(sbn_module *m, sbn_tensor *input, sbn_tensor **out);
  /*
   * Optional: given dy (shaped like the last forward's output) writes a new
   * dx into *out and accumulates (+=) parameter gradients.  Uses what the
   * last forward saved.
   */
  int (*backward)(sbn_module *m, sbn_tensor *dy, sbn_tensor **out);
  /*
   * Optional: the text inside "Type(...)" in repr, snprintf-style (returns
   * the full length, writes at most len bytes).  May contain newlines.
   */
  int (*extra_repr)(const sbn_module *m, char *buf, size_t len);
  /* Optional: frees impl when the last reference goes. */
  void (*destroy)(void *impl);
  /* Optional: refill parameters / running statistics with initial values. */
  int (*reset_parameters)(sbn_module *m);
  int (*reset_running_stats)(sbn_module *m);
  unsigned flags; /* SBN_MODULE_* */
} sbn_module_vtable;

/*
 * A new module with no attributes, training = true.  vt must outlive the
 * module (normally a static const).  impl belongs to the module from now on:
 * vt->destroy(impl) is called with the last reference, also when this call
 * fails (except for a NULL out or vt).
 */
SBN_API int sbn_module_new(const sbn_module_vtable *vt, void *impl, sbn_module **out);
SBN_API sbn_module *sbn_module_ref(sbn_module *m);
/* Drops one reference; NULL is a no-op. */
SBN_API void sbn_module_free(sbn_module *m);
SBN_API void *sbn_module_impl(const sbn_module *m);
SBN_API const sbn_module_vtable *sbn_module_vtable_of(const sbn_module *m);
SBN_API const char *sbn_module_type_name(const sbn_module *m);

/* ---- attributes ----------------------------------------------------------- */

/*
 * Sets attribute name to a parameter (the tensor is marked as a parameter and
 * gets a gradient slot), a buffer or a submodule.  Re-assigning a name keeps
 * its position for repr; a NULL value removes the attribute.  SBN_EINVAL for
 * a bad name, for a cycle, or when a tensor already marked as a parameter is
 * set as a buffer.
 */
SBN_API int sbn_module_set_parameter(sbn_module *m, const char *name, sbn_tensor *t);
SBN_API int sbn_module_set_buffer(sbn_module *m, const char *name, sbn_tensor *t);
SBN_API int sbn_module_set_module(sbn_module *m, const char *name, sbn_module *child);
/* Appends to the list attribute name (created empty if missing; SBN_EINVAL
 * when name is a plain attribute). */
SBN_API int sbn_module_append_parameter(sbn_module *m, const char *name, sbn_tensor *t);
SBN_API int sbn_module_append_buffer(sbn_module *m, const char *name, sbn_tensor *t);
SBN_API int sbn_module_append_module(sbn_module *m, const char *name, sbn_module *child);

/*
 * Looks up a dotted path below m ("i.bn", "layers.1", "bn.weight").
 * Returns a borrowed pointer or NULL when there is none.
 */
SBN_API sbn_module *sbn_module_get_module(const sbn_module *m, const char *path);
SBN_API sbn_tensor *sbn_module_get_tensor(const sbn_module *m, const char *path);

/* ---- traversal ------------------------------------------------------------ */

enum sbn_list_kind { SBN_LIST_MODULES = 1, SBN_LIST_TENSORS = 2 };

/*
 * The result of a traversal: count entries, each with a dotted key, the item
 * (sbn_module* or sbn_tensor* according to kind, one reference each) and the
 * module whose attribute held it (borrowed; NULL for the root in
 * named_modules).  Initialize with {0} or let the function do it; free the
 * contents with sbn_named_list_release() (the struct is the caller's).
 */
typedef struct sbn_named_list {
  int kind;
  size_t count;
  char **names;
  void **items;
  sbn_module **parents;
} sbn_named_list;

SBN_API void sbn_named_list_release(sbn_named_list *l);

/*
 * prefix may be NULL (keys are paths from m).  recursive = 0 lists only m's
 * own attributes.  *out is overwritten (not released first).
 */
SBN_API int sbn_module_named_parameters(sbn_module *m, const char *prefix, int recursive,
                                        sbn_named_list *out);
SBN_API int sbn_module_named_buffers(sbn_module *m, const char *prefix, int recursive,
                                     sbn_named_list *out);
SBN_API int sbn_module_named_tensors(sbn_module *m, const char *prefix, int recursive,
                                     sbn_named_list *out);
/* Direct submodules only (list attributes expanded: "layers.0"). */
SBN_API int sbn_module_named_children(sbn_module *m, sbn_named_list *out);
/* m itself first (key "" or prefix), then every submodule. */
SBN_API int sbn_module_named_modules(sbn_module *m, const char *prefix, sbn_named_list *out);
/* The unnamed variants: same lists (keys filled all the same). */
SBN_API int sbn_module_parameters(sbn_module *m, int recursive, sbn_named_list *out);
SBN_API int sbn_module_buffers(sbn_module *m, int recursive, sbn_named_list *out);
SBN_API int sbn_module_tensors(sbn_module *m, int recursive, sbn_named_list *out);
SBN_API int sbn_module_children(sbn_module *m, sbn_named_list *out);
SBN_API int sbn_module_modules(sbn_module *m, sbn_named_list *out);

/* fn(module, ud) for m and every submodule, pre-order, each once.  Stops at
 * the first status other than SBN_OK and returns it. */
typedef int (*sbn_module_fn)(sbn_module *m, void *ud);
SBN_API int sbn_module_apply(sbn_module *m, sbn_module_fn fn, void *ud);

/* ---- modes ---------------------------------------------------------------- */

/*
 * Sets the training flag of m (and of every submodule when recursive).
 * Fails only for a NULL m or when out of memory (flags may then be partly
 * set).
 */
SBN_API int sbn_module_train(sbn_module *m, int mode, int recursive);
/* sbn_module_train(m, 0, 1). */
SBN_API int sbn_module_eval(sbn_module *m);
SBN_API int sbn_module_is_training(const sbn_module *m);
/* Sets quantize_disabled on m and every submodule (same failures). */
SBN_API int sbn_module_disable_quantize(sbn_module *m, int value);
SBN_API int sbn_module_quantize_disabled(const sbn_module *m);

/* ---- computation ---------------------------------------------------------- */

/*
 * Calls m like MegEngine's m(x): the pre-hooks (in registration order), the
 * vtable's forward, then the forward hooks.  *out gets a new reference; on
 * failure *out is untouched and every intermediate is freed.  The input is
 * not modified.
 */
SBN_API int sbn_module_call(sbn_module *m, sbn_tensor *input, sbn_tensor **out);
/* The vtable's forward alone, without hooks (MegEngine's m.forward(x)). */
SBN_API int sbn_module_forward(sbn_module *m, sbn_tensor *input, sbn_tensor **out);
/*
 * Backward through m from the saved state of its last forward: *dx gets a
 * new reference; parameter gradients are accumulated.  SBN_ESTATE when the
 * module has no backward or has not run forward.  Hooks are not involved:
 * an output replaced by a hook is differentiated as if it were not.
 */
SBN_API int sbn_module_backward(sbn_module *m, sbn_tensor *dy, sbn_tensor **dx);

/*
 * Hooks.  A pre-hook gets the input slot; to replace the input it stores a
 * new reference there and frees the old one (sbn_tensor_replace does both).
 * A forward hook gets the input and the output slot, likewise replaceable.
 * A hook returning an error aborts the call with that status.
 */
typedef int (*sbn_forward_pre_hook)(sbn_module *m, sbn_tensor **input, void *ud);
typedef int (*sbn_forward_hook)(sbn_module *m, sbn_tensor *input, sbn_tensor **output,
                                void *ud);

/*
 * A registration handle.  sbn_hook_remove() unregisters the hook; it is
 * idempotent and harmless after the module is gone.  sbn_hook_free() frees
 * the handle only (the hook stays registered); NULL is a no-op.
 */
typedef struct sbn_hook sbn_hook;
SBN_API int sbn_module_register_forward_pre_hook(sbn_module *m, sbn_forward_pre_hook fn,
                                                 void *ud, sbn_hook **handle);
SBN_API int sbn_module_register_forward_hook(sbn_module *m, sbn_forward_hook fn, void *ud,
                                             sbn_hook **handle);
SBN_API void sbn_hook_remove(sbn_hook *h);
SBN_API void sbn_hook_free(sbn_hook *h);

/* ---- parameters and state ------------------------------------------------- */

/* Zeroes the gradient of every parameter that has a gradient slot.
 * Allocates nothing and cannot fail but for a NULL module (SBN_EINVAL). */
SBN_API int sbn_module_zero_grad(sbn_module *m);

/* vtable reset_parameters / reset_running_stats on m and every submodule
 * that has one (MegEngine has them per layer; on a layer it is the same). */
SBN_API int sbn_module_reset_parameters(sbn_module *m);
SBN_API int sbn_module_reset_running_stats(sbn_module *m);

/*
 * Legacy ParamPack helper: walks m's own attributes in sorted order (lists
 * not expanded, each module or tensor once), numbering parameters from
 * start_pos; when the number is below n and params[number] is not NULL, the
 * attribute's tensor is replaced by params[number] (same shape required,
 * SBN_ESHAPE otherwise, checked before anything changes).  *visited (may be
 * NULL) receives how many parameters were numbered.
 */
SBN_API int sbn_module_replace_param(sbn_module *m, sbn_tensor *const *params, size_t n,
                                     size_t start_pos, size_t *visited);

/*
 * An ordered string -> tensor map (insertion order kept).  Init with
 * sbn_state_dict_init() or {0}; release frees its contents.
 */
typedef struct sbn_state_dict {
  size_t count, cap;
  char **keys;
  sbn_tensor **values;
} sbn_state_dict;

SBN_API void sbn_state_dict_init(sbn_state_dict *sd);
SBN_API void sbn_state_dict_release(sbn_state_dict *sd);
/* Adds key (or replaces its value, keeping the position), taking a
 * reference to t (not NULL). */
SBN_API int sbn_state_dict_set(sbn_state_dict *sd, const char *key, sbn_tensor *t);
/* Borrowed value or NULL. */
SBN_API sbn_tensor *sbn_state_dict_get(const sbn_state_dict *sd, const char *key);
/* Removes key; SBN_EKEY if absent. */
SBN_API int sbn_state_dict_remove(sbn_state_dict *sd, const char *key);

/*
 * Fills out (initialized here) with m's state: its own tensors first in
 * sorted order, then each submodule's, recursively; keys are prefix (NULL =
 * "", concatenated verbatim: pass "net.") + dotted path.  Deduplication is per
 * module: a tensor shared by two submodules appears under both keys.  Values
 * are copies, or with keep_var the module's own tensors (references).
 */
SBN_API int sbn_module_state_dict(sbn_module *m, const char *prefix, int keep_var,
                                  sbn_state_dict *out);

/*
 * A loader callback for sbn_module_load_state_dict_cb: for key (and the
 * module's current tensor var) store a new reference in *value, or leave
 * it NULL for "missing".
 */
typedef int (*sbn_state_loader)(const char *key, const sbn_tensor *var, sbn_tensor **value,
                                void *ud);

/*
 * Loads values into m's tensors (keys as state_dict with no prefix).  Each
 * value must have the tensor's shape (for SBN_MODULE_FLAT_STATE modules such
 * as BatchNorm, any shape with the same number of elements).  Every value is
 * checked first: on any failure (SBN_ESHAPE naming the key and both shapes;
 * SBN_EKEY when strict and keys are unused or missing, naming all of them)
 * nothing is changed.  Not strict: unused and missing keys are ignored.
 * With a callback there are no unused keys.
 */
SBN_API int sbn_module_load_state_dict(sbn_module *m, const sbn_state_dict *sd, int strict);
SBN_API int sbn_module_load_state_dict_cb(sbn_module *m, sbn_state_loader fn, void *ud,
                                          int strict);

/*
 * MegEngine's repr: "Type(extra)" or, with submodules, one "(name): child"
 * line each, in attribute insertion order, indented by two spaces per level.
 * *out is a new string to free with sbn_free().
 */
SBN_API int sbn_module_repr(const sbn_module *m, char **out);

/* Frees memory returned by the library (strings); NULL is a no-op. */
SBN_API void sbn_free(void *p);

#ifdef __cplusplus
}
#endif

#endif /* SBN_MODULE_H */
