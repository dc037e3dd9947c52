/*
 * msg.h - Envelope encoding and decoding on top of the framing.
 *
 * Internal to sbn: the generated protobuf-c types appear here and in the
 * coordinator, never in the client's public headers.
 */
#ifndef SBN_MSG_H
#define SBN_MSG_H

#include <stddef.h>
#include <stdint.h>

#include "sbn.pb-c.h"

/*
 * Encodes env as one frame (header + body) in a fresh malloc'd buffer owned by
 * the caller.  Returns SBN_OK, SBN_ENOMEM, or SBN_ETOOBIG when the body would
 * exceed max_frame (nothing is allocated then).
 */
int sbn__msg_encode(const Sbn__Envelope *env, uint32_t max_frame, uint8_t **out, size_t *outlen);

/*
 * Decodes one frame body.  Returns the envelope (free with sbn__msg_free) or
 * NULL with a message in err when the bytes are not a valid Envelope or no
 * body is set.
 */
Sbn__Envelope *sbn__msg_decode(const uint8_t *body, size_t len, char *err, size_t errlen);
/* The same with the allocator the envelope's memory comes from (NULL =
 * malloc); free such an envelope through that allocator too. */
Sbn__Envelope *sbn__msg_decode_with(ProtobufCAllocator *alloc, const uint8_t *body, size_t len,
                                    char *err, size_t errlen);
void sbn__msg_free(Sbn__Envelope *env);

/*
 * sbn__msg_decode_with for an arena's allocator (sbn__arena_allocator: its
 * frees are no-ops), without copying a Contribute's or Result's packed float
 * field when it is the body's last field (as sbn__msg_tail_prefix writes
 * it) and its values are aligned for float: n_fvals and fvals then point
 * into body, which must outlive the envelope.  Any other body is decoded
 * like sbn__msg_decode_with, with the same result.
 */
Sbn__Envelope *sbn__msg_decode_tail(ProtobufCAllocator *alloc, const uint8_t *body, size_t len,
                                    char *err, size_t errlen);

/* Packed floats and doubles travel little-endian: on a host of that order
 * they can be written to the wire straight from memory. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define SBN_WIRE_IS_HOST_ORDER 1
#else
#define SBN_WIRE_IS_HOST_ORDER 0
#endif

/*
 * A frame whose values need no copy: env's body (a Contribute or a Result)
 * is encoded without its packed float field `field`, and that field is
 * appended last, its tail_bytes of little-endian values written straight
 * from wherever they are (protobuf allows fields in any order; decoders see
 * an ordinary message).  Computes the frame: the prefix (frame header,
 * envelope tag and length, the body without the field, the field's tag and
 * length) is *prefix_len bytes, the frame body *body_len bytes; with out !=
 * NULL (cap >= *prefix_len) writes the prefix there.  The field must be
 * empty in env, and so must its pad.  Returns SBN_OK, or SBN_ETOOBIG when
 * the body would exceed max_frame, or SBN_EINVAL for a body without such a
 * field.
 */
#define SBN_MSG_CONTRIBUTE_FVALS 9 /* Contribute.fvals in sbn.proto */
#define SBN_MSG_RESULT_FVALS 8     /* Result.fvals */
#define SBN_MSG_PAD 15             /* Contribute.pad and Result.pad */
/* The values start at a multiple of this many bytes from the frame's first
 * byte (a pad field before them makes it so), so that a receiver whose
 * frame starts aligned finds them aligned (see sbn__msg_decode_tail). */
#define SBN_MSG_TAIL_ALIGN 64
int sbn__msg_tail_prefix(const Sbn__Envelope *env, uint32_t field, size_t tail_bytes,
                         uint32_t max_frame, uint8_t *out, size_t cap, size_t *prefix_len,
                         size_t *body_len);

/* "forward", "backward", ... for logs and messages. */
const char *sbn__phase_name(int phase);

#endif /* SBN_MSG_H */
