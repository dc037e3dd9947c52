/*
 * fuzz_frame.c - libFuzzer target for the pure decoding path: the frame
 * decoder fed in pieces of input-chosen sizes, the Envelope decoder on
 * every whole frame, a re-encode of what decoded, and the statistics checks
 * on decoded contributions, and the in-place decoder (sbn__msg_decode_tail)
 * against the copying one.
 *
 * Input: byte 0 chooses the piece size pattern and the frame limit, the
 * rest is the byte stream.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "frame.h"
#include "merge.h"
#include "msg.h"
#include "sbn/status.h"

static const uint32_t limits[] = {SBN_MAX_FRAME_FLOOR, 4096, 65536, SBN_MAX_FRAME_DEFAULT};

/* The in-place decoder agrees with the copying one: both refuse the bytes,
 * or both give a message that encodes to the same bytes. */
static void check_tail_decode(const uint8_t *body, size_t len, const Sbn__Envelope *env) {
  static sbn__arena arena; /* kept across inputs, as a connection keeps it */
  char err[160];
  ProtobufCAllocator al = sbn__arena_allocator(&arena);
  Sbn__Envelope *t = sbn__msg_decode_tail(&al, body, len, err, sizeof(err));
  if ((t == NULL) != (env == NULL))
    abort();
  if (t != NULL) {
    uint8_t *a = NULL, *b = NULL;
    size_t la = 0, lb = 0;
    int ra = sbn__msg_encode(t, SBN_MAX_FRAME_CEILING, &a, &la);
    int rb = sbn__msg_encode(env, SBN_MAX_FRAME_CEILING, &b, &lb);
    if (ra != rb || la != lb || (ra == SBN_OK && memcmp(a, b, la) != 0))
      abort();
    free(a);
    free(b);
  }
  sbn__arena_reset(&arena);
}

static void check_envelope(const uint8_t *body, size_t len) {
  char err[160];
  Sbn__Envelope *env = sbn__msg_decode(body, len, err, sizeof(err));
  check_tail_decode(body, len, env);
  if (env == NULL)
    return;
  /*
   * What decodes re-encodes.  The re-encoding is decoded again for the
   * memory checks only: protobuf-c keeps unknown fields (even field number
   * 0) and a second decode may legitimately refuse them.
   */
  uint8_t *out;
  size_t olen;
  if (sbn__msg_encode(env, SBN_MAX_FRAME_CEILING, &out, &olen) == SBN_OK) {
    sbn__msg_free(sbn__msg_decode(out + SBN_FRAME_HEADER_SIZE, olen - SBN_FRAME_HEADER_SIZE, err,
                                  sizeof(err)));
    free(out);
  }
  if (env->body_case == SBN__ENVELOPE__BODY_CONTRIBUTE) {
    const Sbn__Contribute *m = env->contribute;
    const char *what;
    size_t C = m->n_a < m->n_b ? m->n_a : m->n_b;
    (void)sbn__stats_check(m->count, m->a, m->b, C, &what);
    (void)sbn__finite_check(m->a, m->n_a);
    (void)sbn__phase_name(m->phase);
  }
  sbn__msg_free(env);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  uint8_t mode = data[0];
  data++;
  size--;
  sbn__framer f;
  sbn__framer_init(&f, limits[mode & 3]);
  size_t piece = 1 + (size_t)(mode >> 2) * 7; /* 1 .. 442 bytes at a time */
  size_t off = 0;
  while (off < size) {
    size_t n = size - off < piece ? size - off : piece;
    if (mode & 0x80) {
      if (sbn__framer_feed(&f, data + off, n) != SBN_OK)
        break;
    } else {
      uint8_t *space;
      long room = sbn__framer_space(&f, n, &space);
      if (room <= 0)
        break;
      if ((size_t)room < n)
        n = (size_t)room;
      memcpy(space, data + off, n);
      sbn__framer_commit(&f, n);
    }
    off += n;
    const uint8_t *body;
    size_t len;
    int rc;
    while ((rc = sbn__framer_next(&f, &body, &len)) == 1) {
      if (len > f.max_frame)
        abort();
      check_envelope(body, len);
    }
    if (rc < 0) {
      /* Sticky: the stream stays bad. */
      if (sbn__framer_next(&f, &body, &len) != rc)
        abort();
      break;
    }
  }
  sbn__framer_release(&f);
  return 0;
}
