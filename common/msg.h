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
int sbn__msg_encode(const Sbn__Envelope *env, uint32_t max_frame, uint8_t **out,
                    size_t *outlen);

/*
 * Decodes one frame body.  Returns the envelope (free with sbn__msg_free) or
 * NULL with a message in err when the bytes are not a valid Envelope or no
 * body is set.
 */
Sbn__Envelope *sbn__msg_decode(const uint8_t *body, size_t len, char *err,
                               size_t errlen);
/* The same with the allocator the envelope's memory comes from (NULL =
 * malloc); free such an envelope through that allocator too. */
Sbn__Envelope *sbn__msg_decode_with(ProtobufCAllocator *alloc, const uint8_t *body,
                                    size_t len, char *err, size_t errlen);
void sbn__msg_free(Sbn__Envelope *env);

/* "forward", "backward", ... for logs and messages. */
const char *sbn__phase_name(int phase);

#endif /* SBN_MSG_H */
