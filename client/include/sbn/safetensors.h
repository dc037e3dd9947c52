/*
 * sbn/safetensors.h - saving and loading state dicts in the safetensors
 * format (https://github.com/huggingface/safetensors), so that weights move
 * between sbn, PyTorch, MegEngine (through numpy) and anything else that
 * reads the format.
 *
 * A file is an 8-byte little-endian header length N, N bytes of JSON
 *
 *   {"__metadata__": {"format": "pt", "producer": "sbn 0.1.0"},
 *    "bn.weight": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}, ...}
 *
 * and then the tensors' raw little-endian bytes, one after another.  sbn
 * tensors are float32, so only dtype "F32" is written or read; keys and
 * shapes are those of sbn_module_state_dict() (BatchNorm entries are flat,
 * shape (C,)).  A rank-0 (scalar) entry loads as shape (1,).
 *
 * Loading checks the whole file before anything changes: the header length
 * (at most SBN_SAFETENSORS_HEADER_MAX and within the file), the JSON (a
 * strict parser for the subset the format uses: objects, strings, arrays of
 * non-negative integers), every entry's dtype, rank, shape and offsets (in
 * range, contiguous from 0, not overlapping, covering the data exactly, the
 * shape's element count matching the byte count).  Errors:
 *   SBN_EIO      the file cannot be opened, read, written or renamed;
 *   SBN_ETOOBIG  the header length exceeds SBN_SAFETENSORS_HEADER_MAX;
 *   SBN_EINVAL   anything else malformed (the message names the file, the key
 *                and, for bad JSON, the byte offset), or a dtype other than F32;
 *   SBN_ESHAPE   a shape that does not match its byte count or has more than
 *                SBN_MAX_DIMS dimensions;
 *   SBN_ENOMEM   out of memory;
 * and those of sbn_module_load_state_dict() (SBN_EKEY, SBN_ESHAPE) when the
 * file does not fit the module.  Every message names the file.  On any
 * failure nothing is changed: not the module, not the caller's state dict,
 * and a save leaves no file behind (the previous one, if any, stays).
 */
#ifndef SBN_SAFETENSORS_H
#define SBN_SAFETENSORS_H

#include "sbn/module.h"
#include "sbn/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Largest JSON header read or written, in bytes (the reference
 * implementation's limit). */
#define SBN_SAFETENSORS_HEADER_MAX 100000000u

/*
 * Writes m's state dict (sbn_module_state_dict(m, NULL, 0, ...)) to path.
 * The file is written as path + ".tmp", synced, then renamed over path, so
 * path holds either the old or the whole new contents; two saves to the same
 * path must not run at once.
 */
SBN_API int sbn_safetensors_save(sbn_module *m, const char *path);

/*
 * Reads path and loads it into m with sbn_module_load_state_dict(m, sd,
 * strict): strict names the unused and missing keys (SBN_EKEY); not strict
 * ignores them.  Shapes must match as they do there.
 */
SBN_API int sbn_safetensors_load(sbn_module *m, const char *path, int strict);

/*
 * The same for a state dict.  Keys must be valid UTF-8, not empty and not
 * "__metadata__" (SBN_EINVAL).  _load_dict initializes out and fills it with
 * new tensors in the file's data order; on failure out is left empty.
 */
SBN_API int sbn_safetensors_save_dict(const sbn_state_dict *sd, const char *path);
SBN_API int sbn_safetensors_load_dict(const char *path, sbn_state_dict *out);

#ifdef __cplusplus
}
#endif

#endif /* SBN_SAFETENSORS_H */
