/*
 * sbn/parallel.h - what data-parallel training needs besides SyncBatchNorm:
 * every replica starts from the same weights, and averages its gradients
 * with the others after every backward.
 *
 * Both calls are collectives: every member of the group calls them with a
 * model of the same structure (the same tensors in the same order with the
 * same sizes), or every member gets SBN_EMISMATCH.  Threading and failure
 * rules are those of sbn/comm.h.
 */
#ifndef SBN_PARALLEL_H
#define SBN_PARALLEL_H

#include "sbn/comm.h"
#include "sbn/module.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Copies every tensor of m (parameters and buffers, named_tensors order)
 * from group rank root to every other member, fused into as few rounds as
 * the chunk size allows.  On failure the tensors of non-root members may be
 * partly updated (see sbn_broadcast).
 */
SBN_API int sbn_module_broadcast(sbn_group *g, sbn_module *m, int root);

/*
 * Replaces the gradient of every parameter of m (named_parameters order) by
 * its mean (SBN_REDUCE_MEAN) or sum over the group, fused into few rounds
 * (small gradients share a chunk).  Parameters without a gradient slot are
 * skipped.  The result is bitwise identical on every member.
 */
SBN_API int sbn_module_allreduce_grads(sbn_group *g, sbn_module *m, sbn_reduce_op op);

#ifdef __cplusplus
}
#endif

#endif /* SBN_PARALLEL_H */
