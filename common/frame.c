/* frame.c - frame header encoding and the incremental frame decoder. */
#include "frame.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sbn/status.h"

/* One socket read on top of a whole frame: what the buffer may hold at most. */
#define SBN_FRAME_READ_SLACK (64u * 1024u)
/* The buffer starts this big and doubles, so small frames never reallocate. */
#define SBN_FRAME_INITIAL_CAP (16u * 1024u)

static void put_u32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *p) {
  return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
         ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

void sbn__frame_header_write(uint8_t out[SBN_FRAME_HEADER_SIZE], uint32_t length) {
  put_u32(out, SBN_FRAME_MAGIC);
  out[4] = (uint8_t)(SBN_PROTOCOL_VERSION >> 8);
  out[5] = (uint8_t)SBN_PROTOCOL_VERSION;
  out[6] = 0;
  out[7] = 0;
  put_u32(out + 8, length);
}

void sbn__frame_header_read(const uint8_t in[SBN_FRAME_HEADER_SIZE],
                            sbn__frame_header *h) {
  h->magic = get_u32(in);
  h->version = (uint16_t)((in[4] << 8) | in[5]);
  h->flags = (uint16_t)((in[6] << 8) | in[7]);
  h->length = get_u32(in + 8);
}

int sbn__frame_header_check(const sbn__frame_header *h, uint32_t max_frame,
                            char *err, size_t errlen) {
  if (h->magic != SBN_FRAME_MAGIC) {
    snprintf(err, errlen, "bad frame magic 0x%08x (expected 0x%08x)",
             (unsigned)h->magic, SBN_FRAME_MAGIC);
    return SBN_EPROTO;
  }
  if (h->version != SBN_PROTOCOL_VERSION) {
    snprintf(err, errlen, "protocol version %u, this side speaks %u",
             (unsigned)h->version, SBN_PROTOCOL_VERSION);
    return SBN_EVERSION;
  }
  if (h->flags != 0) {
    snprintf(err, errlen, "reserved frame flags 0x%04x are not zero",
             (unsigned)h->flags);
    return SBN_EPROTO;
  }
  if (h->length > max_frame) {
    snprintf(err, errlen, "frame of %u bytes exceeds the limit of %u bytes",
             (unsigned)h->length, (unsigned)max_frame);
    return SBN_ETOOBIG;
  }
  return SBN_OK;
}

void sbn__framer_init(sbn__framer *f, uint32_t max_frame) {
  memset(f, 0, sizeof(*f));
  f->max_frame = max_frame;
}

void sbn__framer_release(sbn__framer *f) {
  free(f->buf);
  f->buf = NULL;
  f->len = f->cap = f->off = 0;
}

size_t sbn__framer_pending(const sbn__framer *f) { return f->len - f->off; }

/* Moves the unconsumed bytes to the front of the buffer. */
static void compact(sbn__framer *f) {
  if (f->off == 0)
    return;
  memmove(f->buf, f->buf + f->off, f->len - f->off);
  f->len -= f->off;
  f->off = 0;
}

long sbn__framer_space(sbn__framer *f, size_t want, uint8_t **space) {
  size_t limit = SBN_FRAME_HEADER_SIZE + (size_t)f->max_frame + SBN_FRAME_READ_SLACK;
  if (want == 0)
    want = 1;
  if (f->off == f->len)
    f->off = f->len = 0;
  if (f->cap - f->len < want)
    compact(f);
  if (f->cap - f->len < want && f->cap < limit) {
    size_t ncap = f->cap ? f->cap : SBN_FRAME_INITIAL_CAP;
    while (ncap < f->len + want && ncap < limit)
      ncap *= 2;
    if (ncap > limit)
      ncap = limit;
    uint8_t *nbuf = realloc(f->buf, ncap);
    if (nbuf == NULL)
      return f->cap > f->len ? (long)(f->cap - f->len) : SBN_ENOMEM;
    f->buf = nbuf;
    f->cap = ncap;
  }
  if (f->cap == f->len)
    return SBN_ETOOBIG; /* the caller did not drain whole frames */
  *space = f->buf + f->len;
  return (long)(f->cap - f->len);
}

void sbn__framer_commit(sbn__framer *f, size_t n) { f->len += n; }

int sbn__framer_swap_buf(sbn__framer *f, uint8_t **buf, size_t *cap) {
  const size_t pending = f->len - f->off;
  if (pending > *cap) {
    uint8_t *nb = realloc(*buf, pending);
    if (nb == NULL)
      return SBN_ENOMEM;
    *buf = nb;
    *cap = pending;
  }
  if (pending > 0)
    memcpy(*buf, f->buf + f->off, pending);
  uint8_t *ob = f->buf;
  size_t ocap = f->cap;
  f->buf = *buf;
  f->cap = *cap;
  f->off = 0;
  f->len = pending;
  *buf = ob;
  *cap = ocap;
  return SBN_OK;
}

int sbn__framer_feed(sbn__framer *f, const void *data, size_t n) {
  const uint8_t *p = data;
  while (n > 0) {
    uint8_t *space = NULL;
    long room = sbn__framer_space(f, n, &space);
    if (room < 0)
      return (int)room;
    size_t k = (size_t)room < n ? (size_t)room : n;
    memcpy(space, p, k);
    sbn__framer_commit(f, k);
    p += k;
    n -= k;
    if (n > 0) {
      /* The buffer is full of whole frames: the caller must drain them. */
      return SBN_ETOOBIG;
    }
  }
  return SBN_OK;
}

int sbn__framer_next(sbn__framer *f, const uint8_t **body, size_t *len) {
  if (f->error)
    return f->error;
  size_t avail = f->len - f->off;
  if (avail < SBN_FRAME_HEADER_SIZE)
    return 0;
  sbn__frame_header h;
  sbn__frame_header_read(f->buf + f->off, &h);
  int rc = sbn__frame_header_check(&h, f->max_frame, f->errmsg, sizeof(f->errmsg));
  if (rc != SBN_OK) {
    f->error = rc;
    return rc;
  }
  if (avail - SBN_FRAME_HEADER_SIZE < h.length)
    return 0;
  *body = f->buf + f->off + SBN_FRAME_HEADER_SIZE;
  *len = h.length;
  f->off += SBN_FRAME_HEADER_SIZE + h.length;
  return 1;
}
