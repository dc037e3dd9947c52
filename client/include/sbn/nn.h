/*
 * sbn/nn.h - BatchNorm, SyncBatchNorm, Sequential and the conversions
 * between BatchNorm and SyncBatchNorm.  All are sbn_module objects (see
 * sbn/module.h): free them with sbn_module_free().
 *
 * BatchNorm semantics (MegEngine's, see docs/api.md):
 *   - inputs (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), float32;
 *     statistics per channel over every axis but 1 (channels-last inputs
 *     (N, ..., C) with SBN_BN_CHANNELS_LAST; a fused ReLU with
 *     SBN_BN_FUSED_RELU, see below);
 *   - training with running stats: batch statistics normalize and the
 *     running stats are updated, momentum weighting the OLD value:
 *       running_mean = momentum * running_mean + (1 - momentum) * mean
 *       running_var  = momentum * running_var + (1 - momentum) * var * n/(n-1)
 *   - eval: running statistics normalize, nothing is updated;
 *   - freeze (train or eval): running statistics, never updated, and no
 *     gradient for weight and bias;
 *   - constructed with track_running_stats = 0: batch statistics always
 *     (a SyncBatchNorm then synchronizes in eval too).
 *   - n = 1 (one value per channel): running_var is left unchanged (the
 *     unbiased variance is undefined) and a warning is printed to stderr
 *     once per process; running_mean is still updated.
 *   - an empty input (N = 0 or a zero spatial size) gives an empty output;
 *     a SyncBatchNorm still takes part in the group's round with count 0.
 * Parameters "weight" (1) and "bias" (0) when affine, buffers "running_mean"
 * (0) and "running_var" (1) when tracking; all float32 of shape (C,).
 * Statistics are computed in double; outputs keep the subtraction of the mean
 * exact even when |mean| >> std.
 *
 * SyncBatchNorm is the same layer with batch statistics merged over a group
 * (sbn/comm.h): one round per training forward, one per backward.  A NULL
 * group or a group of one is plain local BatchNorm (bitwise equal, no
 * network).  A failed round leaves the layer (running stats, saved state)
 * and the gradients unchanged and its status is returned unchanged.
 *
 * Plain layers print as "BatchNorm(16, eps=1e-05, ...)" whatever the input
 * rank (this port has one class for MegEngine's BatchNorm1d/2d and
 * PyTorch's BatchNorm3d).
 */
#ifndef SBN_NN_H
#define SBN_NN_H

#include <stddef.h>

#include "sbn/comm.h"
#include "sbn/module.h"
#include "sbn/status.h"
#include "sbn/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- BatchNorm / SyncBatchNorm ------------------------------------------- */

typedef struct sbn_bn_options {
  size_t num_features;     /* C, >= 1 */
  double eps;              /* 1e-5, finite and >= 0 */
  double momentum;         /* 0.9, in [0, 1] */
  int affine;              /* 1: learnable weight and bias */
  int track_running_stats; /* 1 */
  int freeze;              /* 0; needs track_running_stats */
  /* SyncBatchNorm only: the group to synchronize over; NULL = local (no
   * network).  Borrowed: it must outlive the layer's use. */
  sbn_group *group;
  /* The layer's identity in rounds (at most SBN_LAYER_MAX-1 bytes, copied);
   * NULL = its dotted path once sbn_module_name_layers() ran, else
   * "SyncBatchNorm#k" (k counts layers created by this thread, so that
   * ranks that are threads of one process number theirs alike). */
  const char *name;
  unsigned flags;    /* SBN_BN_* below, OR-ed; 0 = NCHW input, no ReLU */
  void *reserved[4]; /* must be NULL */
} sbn_bn_options;

/*
 * sbn_bn_options.flags.  Any other bit is SBN_EINVAL (bit 0 is not used and
 * stays invalid).  Flags are fixed at construction, kept by the
 * conversions, returned by sbn_bn_get_options and shown in the repr only
 * when set; state_dict is the same whatever the flags.
 *
 * SBN_BN_CHANNELS_LAST: inputs are (N, ..., C), channels on the LAST axis
 *   (NHWC-style), rank 2..5: (N, C), (N, L, C), (N, H, W, C), (N, D, H, W, C).
 *   Statistics per channel over all other positions, exactly as for the
 *   NCHW layout; for rank 2 both layouts are the same.  Output and dx have
 *   the input's shape.
 * SBN_BN_FUSED_RELU: y = max(0, bn(x)) in the same pass as the
 *   normalization (a NaN stays NaN).  Backward masks dy by y > 0 before the
 *   BatchNorm backward (ReLU's gradient at 0 is 0, as in PyTorch).  The mask
 *   is recomputed from the saved input and the forward's per-channel
 *   constants inside the backward's two passes: no extra pass and no extra
 *   memory (nothing of the output is kept).
 */
#define SBN_BN_CHANNELS_LAST 0x2u
#define SBN_BN_FUSED_RELU 0x4u

/* Fills o with the defaults above for C = num_features. */
SBN_API void sbn_bn_options_init(sbn_bn_options *o, size_t num_features);

/*
 * New layers.  SBN_EINVAL (message naming the option) for C = 0, a bad eps
 * or momentum, unknown flags, or freeze without track_running_stats.
 */
SBN_API int sbn_batchnorm_new(const sbn_bn_options *o, sbn_module **out);
SBN_API int sbn_syncbatchnorm_new(const sbn_bn_options *o, sbn_module **out);

/* 1 for a SyncBatchNorm, 0 for a plain BatchNorm, -1 for another module. */
SBN_API int sbn_bn_kind(const sbn_module *m);

/* The layer's current options (name: its identity; group as set).
 * SBN_EINVAL when m is not a BatchNorm. */
SBN_API int sbn_bn_get_options(const sbn_module *m, sbn_bn_options *o);

/* Sets freeze (SBN_EINVAL when the layer does not track running stats). */
SBN_API int sbn_bn_set_freeze(sbn_module *m, int freeze);
/* Sets the group (SyncBatchNorm; on a plain layer it is kept for a later
 * conversion). */
SBN_API int sbn_bn_set_group(sbn_module *m, sbn_group *g);
/* Sets the user-given identity (NULL clears it). */
SBN_API int sbn_bn_set_name(sbn_module *m, const char *name);
/* The identity sent with rounds (owned by the layer; NULL if m is no BN). */
SBN_API const char *sbn_bn_layer_name(const sbn_module *m);

/*
 * Forward/backward are sbn_module_call / sbn_module_forward /
 * sbn_module_backward.  Input errors: SBN_ESHAPE for a rank outside 2..5 or
 * a channel count other than num_features (on axis 1, or on the last axis
 * for SBN_BN_CHANNELS_LAST), naming the shapes and the layout.  Backward
 * needs a forward first (SBN_ESTATE) and dy of the input's shape; it keeps a
 * reference to the last forward's input, which must not be modified before
 * backward.  A layer applied twice before one backward differentiates its
 * last application only.
 */

/* ---- layer identities and model check ------------------------------------ */

/*
 * Gives every BatchNorm / SyncBatchNorm in root's tree its dotted path from
 * root as identity ("prefix." + path with a prefix, as named_modules keys),
 * unless it has a user-given name.  root itself is named only when a prefix
 * is given (it gets the prefix).  A layer reachable twice keeps the first
 * path.  SBN_EINVAL when a path is longer than SBN_LAYER_MAX-1 bytes or has
 * a space (no layer is renamed then).
 */
SBN_API int sbn_module_name_layers(sbn_module *root, const char *prefix);

/*
 * Compares root's SyncBatchNorm layers across the members of g before
 * training: one line per layer in named_modules order,
 * "name C eps momentum affine track freeze", followed by " channels_last"
 * and/or " fused_relu" when those flags are set, sent to the coordinator, which
 * answers SBN_EMISMATCH naming the first difference.  NULL g (or a group of
 * one): SBN_OK with no network.
 */
SBN_API int sbn_check_model(sbn_group *g, sbn_module *root);
/* The text sbn_check_model sends; *out to free with sbn_free(). */
SBN_API int sbn_model_description(sbn_module *root, char **out, size_t *len);

/* ---- Sequential ------------------------------------------------------------ */

/*
 * A container calling its layers in order; they are its children "0", "1",
 * ... (sorted as strings in traversals: "10" before "2", like MegEngine).
 * layers may be NULL when n is 0.  Backward runs the layers' backward in
 * reverse order (each must have one).
 */
SBN_API int sbn_sequential_new(sbn_module *const *layers, size_t n, sbn_module **out);
SBN_API int sbn_sequential_append(sbn_module *seq, sbn_module *layer);
SBN_API size_t sbn_sequential_len(const sbn_module *seq);
/* Borrowed layer i, or NULL. */
SBN_API sbn_module *sbn_sequential_get(const sbn_module *seq, size_t i);

/* ---- conversions ------------------------------------------------------------ */

/*
 * Turns every plain BatchNorm in root's tree (root included) into a
 * SyncBatchNorm over g, in place: the same module objects, so weights,
 * running stats, options, training flags, hooks and sharing are all kept
 * and pointers the caller holds stay valid.  *converted (may be NULL)
 * receives how many layers changed.  Cannot fail for a valid root.
 */
SBN_API int sbn_convert_sync_batchnorm(sbn_module *root, sbn_group *g, size_t *converted);
/* The opposite, for single-process inference; the group is forgotten. */
SBN_API int sbn_revert_sync_batchnorm(sbn_module *root, size_t *converted);

#ifdef __cplusplus
}
#endif

#endif /* SBN_NN_H */
