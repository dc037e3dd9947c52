/* msg.c - Envelope encoding and decoding. */
#include "msg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "sbn/status.h"

int sbn__msg_encode(const Sbn__Envelope *env, uint32_t max_frame, uint8_t **out, size_t *outlen) {
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

Sbn__Envelope *sbn__msg_decode(const uint8_t *body, size_t len, char *err, size_t errlen) {
  return sbn__msg_decode_with(NULL, body, len, err, errlen);
}

Sbn__Envelope *sbn__msg_decode_with(ProtobufCAllocator *alloc, const uint8_t *body, size_t len,
                                    char *err, size_t errlen) {
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

/* Reads a varint at *p (< end) into *v; 0 when it runs past end or is too long. */
static int varint_get(const uint8_t **p, const uint8_t *end, uint64_t *v) {
  uint64_t r = 0;
  for (unsigned shift = 0; shift < 64 && *p < end; shift += 7) {
    const uint8_t b = *(*p)++;
    r |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *v = r;
      return 1;
    }
  }
  return 0;
}

/* A tag or a length: as protobuf-c reads them, at most 5 bytes, and here
 * below 2^32 too (protobuf-c drops a tag's bits past 32, so a longer value
 * could name a different field to it): 0 otherwise, and the full decoder
 * judges the bytes. */
static int varint32_get(const uint8_t **p, const uint8_t *end, uint64_t *v) {
  const uint8_t *start = *p;
  return varint_get(p, end, v) && *p - start <= 5 && *v <= UINT32_MAX;
}

/*
 * Finds the one length-delimited field `field` of the message in
 * [p, end), when it is the message's last field: 1 with its tag's start
 * and its data, else 0 (absent, repeated, not last, or bytes that do not
 * parse, which the full decoder then judges).
 */
static int find_last_field(const uint8_t *p, const uint8_t *end, uint32_t field,
                           const uint8_t **tag_at, const uint8_t **data, size_t *data_len) {
  int found = 0;
  while (p < end) {
    const uint8_t *start = p;
    uint64_t tag, v;
    if (!varint32_get(&p, end, &tag))
      return 0;
    if (tag >> 3 == field && (tag & 7) != 2)
      return 0; /* unpacked values of the field: the decoder joins them */
    switch (tag & 7) {
    case 0: /* varint */
      if (!varint_get(&p, end, &v))
        return 0;
      break;
    case 1: /* 64-bit */
      if (end - p < 8)
        return 0;
      p += 8;
      break;
    case 5: /* 32-bit */
      if (end - p < 4)
        return 0;
      p += 4;
      break;
    case 2: /* length-delimited */
      if (!varint32_get(&p, end, &v) || v > (uint64_t)(end - p))
        return 0;
      if (tag >> 3 == field) {
        if (found)
          return 0; /* a packed field may come in pieces: let the decoder join them */
        found = 1;
        *tag_at = start;
        *data = p;
        *data_len = (size_t)v;
      }
      p += v;
      break;
    default:
      return 0;
    }
    if (found && p != *data + *data_len)
      return 0; /* another field follows it */
  }
  return found;
}

Sbn__Envelope *sbn__msg_decode_tail(ProtobufCAllocator *alloc, const uint8_t *body, size_t len,
                                    char *err, size_t errlen) {
  const uint8_t *p = body, *end = body + len;
  uint64_t tag, sub_len;
  if (!SBN_WIRE_IS_HOST_ORDER || !varint32_get(&p, end, &tag) || (tag & 7) != 2 ||
      !varint32_get(&p, end, &sub_len) || sub_len != (uint64_t)(end - p))
    return sbn__msg_decode_with(alloc, body, len, err, errlen);
  const ProtobufCMessageDescriptor *desc;
  uint32_t field;
  if (tag >> 3 == SBN__ENVELOPE__BODY_CONTRIBUTE) {
    desc = &sbn__contribute__descriptor;
    field = SBN_MSG_CONTRIBUTE_FVALS;
  } else if (tag >> 3 == SBN__ENVELOPE__BODY_RESULT) {
    desc = &sbn__result__descriptor;
    field = SBN_MSG_RESULT_FVALS;
  } else {
    return sbn__msg_decode_with(alloc, body, len, err, errlen);
  }
  const uint8_t *tag_at = NULL, *data = NULL;
  size_t data_len = 0;
  if (!find_last_field(p, end, field, &tag_at, &data, &data_len) || data_len % sizeof(float) ||
      (uintptr_t)data % _Alignof(float) != 0)
    return sbn__msg_decode_with(alloc, body, len, err, errlen);
  /* The body without the field, then the field's values where they are. */
  ProtobufCMessage *sub = protobuf_c_message_unpack(desc, alloc, (size_t)(tag_at - p), p);
  Sbn__Envelope *env = alloc->alloc(alloc->allocator_data, sizeof(*env));
  if (sub == NULL || env == NULL) {
    snprintf(err, errlen, "frame body of %zu bytes is not a valid message", len);
    return NULL;
  }
  sbn__envelope__init(env);
  if (desc == &sbn__contribute__descriptor) {
    Sbn__Contribute *c = (Sbn__Contribute *)sub;
    env->body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
    env->contribute = c;
    c->n_fvals = data_len / sizeof(float);
    c->fvals = (float *)data;
  } else {
    Sbn__Result *r = (Sbn__Result *)sub;
    env->body_case = SBN__ENVELOPE__BODY_RESULT;
    env->result = r;
    r->n_fvals = data_len / sizeof(float);
    r->fvals = (float *)data;
  }
  return env;
}

static size_t varint_size(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

static uint8_t *varint_put(uint8_t *p, uint64_t v) {
  while (v >= 0x80) {
    *p++ = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  *p++ = (uint8_t)v;
  return p;
}

/* The wire-type-2 (length-delimited) tag of a field below 16: one byte. */
static uint8_t tag_len_delim(uint32_t field) {
  return (uint8_t)((field << 3) | 2);
}

int sbn__msg_tail_prefix(const Sbn__Envelope *env, uint32_t field, size_t tail_bytes,
                         uint32_t max_frame, uint8_t *out, size_t cap, size_t *prefix_len,
                         size_t *body_len) {
  const ProtobufCMessage *sub;
  uint32_t body_field;
  if (env->body_case == SBN__ENVELOPE__BODY_CONTRIBUTE && field == SBN_MSG_CONTRIBUTE_FVALS &&
      env->contribute->n_fvals == 0 && env->contribute->pad.len == 0) {
    sub = &env->contribute->base;
    body_field = SBN__ENVELOPE__BODY_CONTRIBUTE;
  } else if (env->body_case == SBN__ENVELOPE__BODY_RESULT && field == SBN_MSG_RESULT_FVALS &&
             env->result->n_fvals == 0 && env->result->pad.len == 0) {
    sub = &env->result->base;
    body_field = SBN__ENVELOPE__BODY_RESULT;
  } else {
    return SBN_EINVAL;
  }
  /* The smallest pad field (none, or its tag, length and 0..127 zeros)
   * that puts the values at a multiple of SBN_MSG_TAIL_ALIGN. */
  const size_t sub_fixed = protobuf_c_message_get_packed_size(sub);
  size_t pad = 0, sub_len = 0, body = 0;
  for (size_t k = 0; k <= 128; k++) {
    pad = k == 0 ? 0 : 2 + (k - 1); /* k - 1 zeros: their length fits one byte */
    sub_len = sub_fixed + pad + 1 + varint_size(tail_bytes) + tail_bytes;
    body = 1 + varint_size(sub_len) + sub_len;
    if ((SBN_FRAME_HEADER_SIZE + body - tail_bytes) % SBN_MSG_TAIL_ALIGN == 0)
      break;
  }
  *prefix_len = SBN_FRAME_HEADER_SIZE + body - tail_bytes;
  *body_len = body;
  if (body > max_frame)
    return SBN_ETOOBIG;
  if (out == NULL)
    return SBN_OK;
  if (cap < *prefix_len)
    return SBN_EINVAL;
  sbn__frame_header_write(out, (uint32_t)body);
  uint8_t *p = out + SBN_FRAME_HEADER_SIZE;
  *p++ = tag_len_delim(body_field);
  p = varint_put(p, sub_len);
  p += protobuf_c_message_pack(sub, p);
  if (pad > 0) {
    *p++ = tag_len_delim(SBN_MSG_PAD);
    *p++ = (uint8_t)(pad - 2);
    memset(p, 0, pad - 2);
    p += pad - 2;
  }
  *p++ = tag_len_delim(field);
  p = varint_put(p, tail_bytes);
  return SBN_OK;
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
