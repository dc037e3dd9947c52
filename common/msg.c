/* msg.c - Envelope encoding and decoding. */
#include "msg.h"

#include <stdio.h>
#include <stdlib.h>

#include "frame.h"
#include "sbn/status.h"

int sbn__msg_encode(const Sbn__Envelope *env, uint32_t max_frame, uint8_t **out,
                    size_t *outlen) {
  size_t body = sbn__envelope__get_packed_size(env);
  if (body > max_frame)
    return SBN_ETOOBIG;
  uint8_t *buf = malloc(SBN_FRAME_HEADER_SIZE + body);
  if (buf == NULL)
    return SBN_ENOMEM;
  sbn__frame_header_write(buf, (uint32_t)body);
  sbn__envelope__pack(env, buf + SBN_FRAME_HEADER_SIZE);
  *out = buf;
  *outlen = SBN_FRAME_HEADER_SIZE + body;
  return SBN_OK;
}

Sbn__Envelope *sbn__msg_decode(const uint8_t *body, size_t len, char *err,
                               size_t errlen) {
  return sbn__msg_decode_with(NULL, body, len, err, errlen);
}

Sbn__Envelope *sbn__msg_decode_with(ProtobufCAllocator *alloc, const uint8_t *body,
                                    size_t len, char *err, size_t errlen) {
  Sbn__Envelope *env = sbn__envelope__unpack(alloc, len, body);
  if (env == NULL) {
    snprintf(err, errlen, "frame body of %zu bytes is not a valid message", len);
    return NULL;
  }
  if (env->body_case == SBN__ENVELOPE__BODY__NOT_SET) {
    snprintf(err, errlen, "message has no body");
    sbn__envelope__free_unpacked(env, alloc);
    return NULL;
  }
  return env;
}

void sbn__msg_free(Sbn__Envelope *env) {
  if (env != NULL)
    sbn__envelope__free_unpacked(env, NULL);
}

const char *sbn__phase_name(int phase) {
  switch (phase) {
  case SBN__PHASE__PHASE_FORWARD: return "forward";
  case SBN__PHASE__PHASE_BACKWARD: return "backward";
  case SBN__PHASE__PHASE_ALLREDUCE: return "allreduce";
  case SBN__PHASE__PHASE_BROADCAST: return "broadcast";
  case SBN__PHASE__PHASE_BARRIER: return "barrier";
  case SBN__PHASE__PHASE_MODEL_CHECK: return "model-check";
  default: return "unknown-phase";
  }
}
