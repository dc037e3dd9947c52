/*
 * test_frame.c - the frame decoder and message codec, without sockets.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "frame.h"
#include "msg.h"
#include "sbn/status.h"

/* Encodes a ping with nonce as one whole frame. */
static uint8_t *ping_frame(uint64_t nonce, size_t *len) {
  Sbn__Ping ping = SBN__PING__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  ping.nonce = nonce;
  env.body_case = SBN__ENVELOPE__BODY_PING;
  env.ping = &ping;
  uint8_t *buf = NULL;
  ck_assert_int_eq(sbn__msg_encode(&env, SBN_MAX_FRAME_DEFAULT, &buf, len), SBN_OK);
  return buf;
}

/* A hello with a job name, so the body is long enough to split usefully. */
static uint8_t *hello_frame(size_t *len) {
  Sbn__Hello h = SBN__HELLO__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  h.protocol_version = SBN_PROTOCOL_VERSION;
  h.job = "a-job-name-of-some-length";
  h.rank = 3;
  h.world_size = 8;
  h.generation = 77;
  env.body_case = SBN__ENVELOPE__BODY_HELLO;
  env.hello = &h;
  uint8_t *buf = NULL;
  ck_assert_int_eq(sbn__msg_encode(&env, SBN_MAX_FRAME_DEFAULT, &buf, len), SBN_OK);
  return buf;
}

static void check_hello_body(const uint8_t *body, size_t len) {
  char err[160];
  Sbn__Envelope *env = sbn__msg_decode(body, len, err, sizeof(err));
  ck_assert_ptr_nonnull(env);
  ck_assert_int_eq(env->body_case, SBN__ENVELOPE__BODY_HELLO);
  ck_assert_str_eq(env->hello->job, "a-job-name-of-some-length");
  ck_assert_uint_eq(env->hello->rank, 3);
  ck_assert_uint_eq(env->hello->world_size, 8);
  ck_assert_uint_eq(env->hello->generation, 77);
  sbn__msg_free(env);
}

START_TEST(header_round_trip) {
  uint8_t raw[SBN_FRAME_HEADER_SIZE];
  sbn__frame_header h;
  char err[160];
  sbn__frame_header_write(raw, 0x01020304u);
  ck_assert_uint_eq(raw[0], 0x53);
  ck_assert_uint_eq(raw[3], 0x46);
  sbn__frame_header_read(raw, &h);
  ck_assert_uint_eq(h.magic, SBN_FRAME_MAGIC);
  ck_assert_uint_eq(h.version, SBN_PROTOCOL_VERSION);
  ck_assert_uint_eq(h.flags, 0);
  ck_assert_uint_eq(h.length, 0x01020304u);
  ck_assert_int_eq(sbn__frame_header_check(&h, 0x01020304u, err, sizeof(err)), SBN_OK);
  ck_assert_int_eq(sbn__frame_header_check(&h, 0x01020303u, err, sizeof(err)), SBN_ETOOBIG);
}
END_TEST

START_TEST(partial_frame) {
  size_t len;
  uint8_t *fr = hello_frame(&len);
  sbn__framer f;
  const uint8_t *body;
  size_t blen;
  sbn__framer_init(&f, SBN_MAX_FRAME_DEFAULT);
  ck_assert_int_eq(sbn__framer_feed(&f, fr, 5), SBN_OK);
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 0);
  ck_assert_int_eq(sbn__framer_feed(&f, fr + 5, len - 6), SBN_OK);
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 0);
  ck_assert_uint_eq(sbn__framer_pending(&f), len - 1);
  ck_assert_int_eq(sbn__framer_feed(&f, fr + len - 1, 1), SBN_OK);
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 1);
  ck_assert_uint_eq(blen, len - SBN_FRAME_HEADER_SIZE);
  check_hello_body(body, blen);
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 0);
  ck_assert_uint_eq(sbn__framer_pending(&f), 0);
  sbn__framer_release(&f);
  free(fr);
}
END_TEST

START_TEST(split_at_every_byte) {
  size_t len;
  uint8_t *fr = hello_frame(&len);
  for (size_t cut = 0; cut <= len; cut++) {
    sbn__framer f;
    const uint8_t *body;
    size_t blen;
    sbn__framer_init(&f, SBN_MAX_FRAME_DEFAULT);
    ck_assert_int_eq(sbn__framer_feed(&f, fr, cut), SBN_OK);
    ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), cut == len ? 1 : 0);
    if (cut < len) {
      ck_assert_int_eq(sbn__framer_feed(&f, fr + cut, len - cut), SBN_OK);
      ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 1);
    }
    check_hello_body(body, blen);
    sbn__framer_release(&f);
  }
  /* And one byte at a time. */
  sbn__framer f;
  const uint8_t *body;
  size_t blen;
  sbn__framer_init(&f, SBN_MAX_FRAME_DEFAULT);
  for (size_t i = 0; i < len; i++) {
    ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 0);
    ck_assert_int_eq(sbn__framer_feed(&f, fr + i, 1), SBN_OK);
  }
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 1);
  check_hello_body(body, blen);
  sbn__framer_release(&f);
  free(fr);
}
END_TEST

START_TEST(several_frames_in_one_feed) {
  enum { NFRAMES = 5 };
  uint8_t all[1024];
  size_t off = 0;
  for (int i = 0; i < NFRAMES; i++) {
    size_t len;
    uint8_t *fr = ping_frame(1000 + (uint64_t)i, &len);
    memcpy(all + off, fr, len);
    off += len;
    free(fr);
  }
  sbn__framer f;
  sbn__framer_init(&f, SBN_MAX_FRAME_DEFAULT);
  ck_assert_int_eq(sbn__framer_feed(&f, all, off), SBN_OK);
  for (int i = 0; i < NFRAMES; i++) {
    const uint8_t *body;
    size_t blen;
    char err[160];
    ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 1);
    Sbn__Envelope *env = sbn__msg_decode(body, blen, err, sizeof(err));
    ck_assert_ptr_nonnull(env);
    ck_assert_int_eq(env->body_case, SBN__ENVELOPE__BODY_PING);
    ck_assert_uint_eq(env->ping->nonce, 1000 + (uint64_t)i);
    sbn__msg_free(env);
  }
  const uint8_t *body;
  size_t blen;
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 0);
  sbn__framer_release(&f);
}
END_TEST

/* Feeds a ping frame with one header byte replaced; returns next()'s status. */
static int corrupt_header(size_t at, uint8_t value, sbn__framer *f) {
  size_t len;
  uint8_t *fr = ping_frame(1, &len);
  fr[at] = value;
  sbn__framer_init(f, SBN_MAX_FRAME_DEFAULT);
  ck_assert_int_eq(sbn__framer_feed(f, fr, len), SBN_OK);
  free(fr);
  const uint8_t *body;
  size_t blen;
  return sbn__framer_next(f, &body, &blen);
}

START_TEST(bad_magic) {
  sbn__framer f;
  ck_assert_int_eq(corrupt_header(0, 'X', &f), SBN_EPROTO);
  ck_assert_ptr_nonnull(strstr(f.errmsg, "magic"));
  sbn__framer_release(&f);
}
END_TEST

START_TEST(wrong_version) {
  sbn__framer f;
  ck_assert_int_eq(corrupt_header(5, 2, &f), SBN_EVERSION);
  ck_assert_ptr_nonnull(strstr(f.errmsg, "version 2"));
  sbn__framer_release(&f);
}
END_TEST

START_TEST(nonzero_flags) {
  sbn__framer f;
  ck_assert_int_eq(corrupt_header(7, 1, &f), SBN_EPROTO);
  ck_assert_ptr_nonnull(strstr(f.errmsg, "flags"));
  sbn__framer_release(&f);
}
END_TEST

START_TEST(oversized_rejected_at_header) {
  enum { LIMIT = 1024 };
  uint8_t hdr[SBN_FRAME_HEADER_SIZE];
  sbn__framer f;
  const uint8_t *body;
  size_t blen;
  sbn__framer_init(&f, LIMIT);
  /* A frame exactly at the limit is fine... */
  sbn__frame_header_write(hdr, LIMIT);
  ck_assert_int_eq(sbn__framer_feed(&f, hdr, sizeof(hdr)), SBN_OK);
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), 0);
  sbn__framer_release(&f);
  /* ...one byte more is refused from the header alone, before any body. */
  sbn__framer_init(&f, LIMIT);
  sbn__frame_header_write(hdr, 0xFFFFFFF0u);
  ck_assert_int_eq(sbn__framer_feed(&f, hdr, sizeof(hdr)), SBN_OK);
  ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), SBN_ETOOBIG);
  ck_assert_ptr_nonnull(strstr(f.errmsg, "exceeds"));
  /* The buffer never grew toward the announced size. */
  ck_assert_uint_le(f.cap, 64u * 1024u);
  sbn__framer_release(&f);
}
END_TEST

START_TEST(errors_are_sticky) {
  sbn__framer f;
  ck_assert_int_eq(corrupt_header(0, 0, &f), SBN_EPROTO);
  size_t len;
  uint8_t *fr = ping_frame(9, &len);
  const uint8_t *body;
  size_t blen;
  sbn__framer_feed(&f, fr, len);
  for (int i = 0; i < 3; i++)
    ck_assert_int_eq(sbn__framer_next(&f, &body, &blen), SBN_EPROTO);
  free(fr);
  sbn__framer_release(&f);
}
END_TEST

START_TEST(bad_bodies) {
  size_t len;
  char err[160];
  uint8_t *fr = hello_frame(&len);
  const uint8_t *body = fr + SBN_FRAME_HEADER_SIZE;
  size_t blen = len - SBN_FRAME_HEADER_SIZE;
  /* Every truncation of the body either fails or decodes a prefix that
   * lost the string's tail; a cut inside the job string must fail. */
  err[0] = '\0';
  ck_assert_ptr_null(sbn__msg_decode(body, blen - 3, err, sizeof(err)));
  ck_assert_ptr_nonnull(strstr(err, "not a valid message"));
  static const uint8_t garbage[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x07};
  ck_assert_ptr_null(sbn__msg_decode(garbage, sizeof(garbage), err, sizeof(err)));
  /* An envelope with no body set. */
  err[0] = '\0';
  ck_assert_ptr_null(sbn__msg_decode(body, 0, err, sizeof(err)));
  ck_assert_ptr_nonnull(strstr(err, "no body"));
  free(fr);
}
END_TEST

START_TEST(encode_too_big) {
  enum { LIMIT = 1024, N = 1000 };
  static double values[N];
  Sbn__Contribute c = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  c.phase = SBN__PHASE__PHASE_FORWARD;
  c.channels = N;
  c.n_a = N;
  c.a = values;
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &c;
  uint8_t *out = NULL;
  size_t outlen = 0;
  ck_assert_int_eq(sbn__msg_encode(&env, LIMIT, &out, &outlen), SBN_ETOOBIG);
  ck_assert_ptr_null(out);
  ck_assert_int_eq(sbn__msg_encode(&env, SBN_MAX_FRAME_DEFAULT, &out, &outlen), SBN_OK);
  ck_assert_uint_gt(outlen, LIMIT);
  free(out);
}
END_TEST

/* Encodes env with its fvals as a raw tail; returns the malloc'd frame. */
static uint8_t *tail_frame(const Sbn__Envelope *env, uint32_t field, const float *v, size_t n,
                           size_t *len) {
  size_t prefix = 0, body = 0;
  ck_assert_int_eq(sbn__msg_tail_prefix(env, field, n * sizeof(float), SBN_MAX_FRAME_CEILING, NULL,
                                        0, &prefix, &body),
                   SBN_OK);
  *len = SBN_FRAME_HEADER_SIZE + body;
  ck_assert_uint_eq(*len, prefix + n * sizeof(float));
  uint8_t *fr = malloc(*len);
  ck_assert_int_eq(sbn__msg_tail_prefix(env, field, n * sizeof(float), SBN_MAX_FRAME_CEILING, fr,
                                        prefix, &prefix, &body),
                   SBN_OK);
  ck_assert_uint_eq(prefix % SBN_MSG_TAIL_ALIGN, 0); /* the values start aligned */
  if (n > 0)
    memcpy(fr + prefix, v, n * sizeof(float));
  return fr;
}

/* A frame with its float payload written raw at the end decodes to the same
 * message as the ordinary encoding, for both bodies that use it. */
START_TEST(raw_tail_decodes_alike) {
  static const size_t ns[] = {0, 1, 31, 32, 4096, 300000};
  static const uint32_t members[] = {1, 3, 200, 70000};
  for (size_t k = 0; k < sizeof(ns) / sizeof(ns[0]); k++) {
    size_t n = ns[k];
    float *v = malloc((n + 1) * sizeof(float));
    for (size_t i = 0; i < n; i++)
      v[i] = (float)i * -0.37f + 1e-30f * (float)(i % 7);
    Sbn__Contribute c = SBN__CONTRIBUTE__INIT;
    Sbn__Envelope env = SBN__ENVELOPE__INIT;
    c.n_members = 4;
    c.members = (uint32_t *)members;
    c.seq = 300 + k;
    c.phase = SBN__PHASE__PHASE_ALLREDUCE;
    c.layer = "allreduce";
    c.channels = (uint32_t)n;
    c.count = n;
    c.op = SBN__REDUCE_OP__REDUCE_MEAN;
    env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
    env.contribute = &c;
    size_t len;
    uint8_t *fr = tail_frame(&env, SBN_MSG_CONTRIBUTE_FVALS, v, n, &len);
    sbn__frame_header h;
    sbn__frame_header_read(fr, &h);
    ck_assert_uint_eq(h.length, len - SBN_FRAME_HEADER_SIZE);
    char err[160];
    Sbn__Envelope *d = sbn__msg_decode(fr + SBN_FRAME_HEADER_SIZE, h.length, err, sizeof(err));
    ck_assert_msg(d != NULL, "%s", err);
    const Sbn__Contribute *dc = d->contribute;
    ck_assert_int_eq(d->body_case, SBN__ENVELOPE__BODY_CONTRIBUTE);
    ck_assert_uint_eq(dc->n_members, 4);
    ck_assert(memcmp(dc->members, members, sizeof(members)) == 0);
    ck_assert(dc->seq == c.seq && dc->phase == c.phase && dc->channels == n && dc->count == n);
    ck_assert_str_eq(dc->layer, "allreduce");
    ck_assert_int_eq(dc->op, SBN__REDUCE_OP__REDUCE_MEAN);
    ck_assert_uint_eq(dc->n_fvals, n);
    ck_assert(n == 0 || memcmp(dc->fvals, v, n * sizeof(float)) == 0);
    sbn__msg_free(d);
    free(fr);

    /* A Result: the usual encoding of the same message, once the pad that
     * aligned the values is dropped. */
    Sbn__Result r = SBN__RESULT__INIT;
    Sbn__Envelope renv = SBN__ENVELOPE__INIT;
    r.seq = c.seq;
    r.phase = c.phase;
    r.layer = "allreduce";
    r.channels = (uint32_t)n;
    r.count = 2 * n;
    renv.body_case = SBN__ENVELOPE__BODY_RESULT;
    renv.result = &r;
    fr = tail_frame(&renv, SBN_MSG_RESULT_FVALS, v, n, &len);
    r.n_fvals = n;
    r.fvals = v;
    uint8_t *plain = NULL, *again = NULL;
    size_t plen = 0, alen = 0;
    ck_assert_int_eq(sbn__msg_encode(&renv, SBN_MAX_FRAME_CEILING, &plain, &plen), SBN_OK);
    Sbn__Envelope *rd = sbn__msg_decode(fr + SBN_FRAME_HEADER_SIZE, len - SBN_FRAME_HEADER_SIZE,
                                        err, sizeof(err));
    ck_assert_msg(rd != NULL, "%s", err);
    ck_assert_uint_lt(rd->result->pad.len, 128);
    for (size_t i = 0; i < rd->result->pad.len; i++)
      ck_assert_uint_eq(rd->result->pad.data[i], 0);
    rd->result->pad.len = 0;
    ck_assert_int_eq(sbn__msg_encode(rd, SBN_MAX_FRAME_CEILING, &again, &alen), SBN_OK);
    ck_assert_uint_eq(plen, alen);
    ck_assert(memcmp(plain, again, plen) == 0);
    sbn__msg_free(rd);
    free(again);
    free(plain);
    free(fr);
    free(v);
  }
}
END_TEST

/* Encodes a decoded envelope the usual way: two envelopes are equal when
 * these bytes are. */
static uint8_t *plain_frame(const Sbn__Envelope *env, size_t *len) {
  uint8_t *out = NULL;
  ck_assert_int_eq(sbn__msg_encode(env, SBN_MAX_FRAME_CEILING, &out, len), SBN_OK);
  return out;
}

/* decode_tail's result against sbn__msg_decode's for the same body: both
 * fail, or both give the same message.  Returns decode_tail's envelope
 * (in the arena) or NULL. */
static Sbn__Envelope *decode_both(sbn__arena *a, const uint8_t *body, size_t len) {
  char err[160], err2[160];
  ProtobufCAllocator al = sbn__arena_allocator(a);
  Sbn__Envelope *t = sbn__msg_decode_tail(&al, body, len, err, sizeof(err));
  Sbn__Envelope *d = sbn__msg_decode(body, len, err2, sizeof(err2));
  ck_assert_msg((t == NULL) == (d == NULL), "decode_tail %s, decode %s at %zu bytes",
                t ? "ok" : err, d ? "ok" : err2, len);
  if (t != NULL) {
    size_t lt, ld;
    uint8_t *ft = plain_frame(t, &lt), *fd = plain_frame(d, &ld);
    ck_assert_uint_eq(lt, ld);
    ck_assert(memcmp(ft, fd, lt) == 0);
    free(ft);
    free(fd);
  }
  sbn__msg_free(d);
  return t;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v) {
  for (; v >= 0x80; v >>= 7)
    *p++ = (uint8_t)(v | 0x80);
  *p++ = (uint8_t)v;
  return p;
}

/* An envelope body: a Contribute packed without fvals, then `extra`, the
 * raw bytes of further fields. */
static size_t contribute_body(const Sbn__Contribute *c, const uint8_t *extra, size_t nextra,
                              uint8_t *out) {
  size_t sub = sbn__contribute__get_packed_size(c) + nextra;
  uint8_t *p = put_varint(out, (SBN__ENVELOPE__BODY_CONTRIBUTE << 3) | 2);
  p = put_varint(p, sub);
  p += sbn__contribute__pack(c, p);
  memcpy(p, extra, nextra);
  return (size_t)(p + nextra - out);
}

/* Allreduce values decode in place when they are the body's last field (as
 * workers and the coordinator send them), and like sbn__msg_decode in every
 * other case. */
START_TEST(raw_tail_decodes_in_place) {
  sbn__arena a;
  sbn__arena_init(&a, 0);
  static const size_t ns[] = {0, 1, 31, 4096, 300000};
  static const uint32_t members[] = {1, 3, 200, 70000};
  for (size_t k = 0; k < sizeof(ns) / sizeof(ns[0]); k++) {
    size_t n = ns[k];
    float *v = malloc((n + 1) * sizeof(float));
    for (size_t i = 0; i < n; i++)
      v[i] = (float)i * 0.61f - 3e-30f * (float)(i % 5);
    Sbn__Contribute c = SBN__CONTRIBUTE__INIT;
    Sbn__Envelope env = SBN__ENVELOPE__INIT;
    c.n_members = 4;
    c.members = (uint32_t *)members;
    c.seq = 77 + k;
    c.phase = SBN__PHASE__PHASE_ALLREDUCE;
    c.layer = "allreduce";
    c.channels = (uint32_t)n;
    c.count = n;
    c.ahead = 1;
    env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
    env.contribute = &c;
    size_t len;
    uint8_t *fr = tail_frame(&env, SBN_MSG_CONTRIBUTE_FVALS, v, n, &len);
    Sbn__Envelope *t = decode_both(&a, fr + SBN_FRAME_HEADER_SIZE, len - SBN_FRAME_HEADER_SIZE);
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->contribute->n_fvals, n);
    ck_assert(t->contribute->ahead && t->contribute->seq == c.seq);
    ck_assert_ptr_eq((const uint8_t *)t->contribute->fvals, fr + len - n * sizeof(float));
    /* The same bytes one byte off: the values would be misaligned, so they
     * are copied (the same message either way, as decode_both checks). */
    uint8_t *off1 = malloc(len + 1);
    memcpy(off1 + 1, fr, len);
    t = decode_both(&a, off1 + 1 + SBN_FRAME_HEADER_SIZE, len - SBN_FRAME_HEADER_SIZE);
    if (n > 0)
      ck_assert((const uint8_t *)t->contribute->fvals < off1 ||
                (const uint8_t *)t->contribute->fvals >= off1 + len + 1);
    free(off1);
    /* The usual encoding puts `ahead` after fvals: decoded by copy. */
    c.n_fvals = n;
    c.fvals = v;
    size_t plen;
    uint8_t *plain = plain_frame(&env, &plen);
    t = decode_both(&a, plain + SBN_FRAME_HEADER_SIZE, plen - SBN_FRAME_HEADER_SIZE);
    if (n > 0) {
      ck_assert((const uint8_t *)t->contribute->fvals < plain ||
                (const uint8_t *)t->contribute->fvals >= plain + plen);
      ck_assert(memcmp(t->contribute->fvals, v, n * sizeof(float)) == 0);
    }
    free(plain);
    free(fr);
    c.n_fvals = 0;
    c.fvals = NULL;
    /* A Result, in place. */
    Sbn__Result r = SBN__RESULT__INIT;
    Sbn__Envelope renv = SBN__ENVELOPE__INIT;
    r.seq = c.seq;
    r.phase = c.phase;
    r.layer = "allreduce";
    r.channels = (uint32_t)n;
    renv.body_case = SBN__ENVELOPE__BODY_RESULT;
    renv.result = &r;
    fr = tail_frame(&renv, SBN_MSG_RESULT_FVALS, v, n, &len);
    t = decode_both(&a, fr + SBN_FRAME_HEADER_SIZE, len - SBN_FRAME_HEADER_SIZE);
    ck_assert_int_eq(t->body_case, SBN__ENVELOPE__BODY_RESULT);
    ck_assert_uint_eq(t->result->n_fvals, n);
    ck_assert_ptr_eq((const uint8_t *)t->result->fvals, fr + len - n * sizeof(float));
    free(fr);
    free(v);
    sbn__arena_reset(&a);
  }

  /* Fields the in-place path must leave to the full decoder, which joins or
   * refuses them: fvals in two packed pieces; an unpacked value before the
   * packed piece; a length that is no multiple of 4; fvals followed by
   * another field; fvals as the wrong wire type. */
  Sbn__Contribute c = SBN__CONTRIBUTE__INIT;
  c.seq = 5;
  c.layer = "allreduce";
  c.phase = SBN__PHASE__PHASE_ALLREDUCE;
  const uint8_t f = (SBN_MSG_CONTRIBUTE_FVALS << 3) | 2, f32 = (SBN_MSG_CONTRIBUTE_FVALS << 3) | 5;
  static const uint8_t two_pieces[] = {f, 4, 0, 0, 128, 63, f, 8, 0, 0, 0, 64, 0, 0, 64, 64};
  static const uint8_t unpacked_first[] = {f32, 0, 0, 128, 63, f, 4, 0, 0, 0, 64};
  static const uint8_t ragged[] = {f, 5, 0, 0, 128, 63, 1};
  static const uint8_t then_ahead[] = {f, 4, 0, 0, 128, 63, 13 << 3, 1};
  static const uint8_t wrong_type[] = {(SBN_MSG_CONTRIBUTE_FVALS << 3) | 1, 0, 0, 0, 0, 0, 0, 0, 0};
  /* A piece of fvals whose 5-byte tag has bit 32 set (protobuf-c drops it),
   * then the last piece: decoded alike, both pieces joined. */
  static const uint8_t long_tag[] = {f | 0x80, 0x80, 0x80, 0x80, 0x10, 4, 0, 0, 128, 63,
                                     f, 4, 0, 0, 0, 64};
  /* The last piece's tag in 6 bytes: protobuf-c refuses it, and so must the
   * in-place path. */
  static const uint8_t six_byte_tag[] = {f | 0x80, 0x80, 0x80, 0x80, 0x80, 0, 4, 0, 0, 128, 63};
  static const struct {
    const uint8_t *b;
    size_t n, want; /* values after decoding, or (size_t)-1: refused */
  } cases[] = {{two_pieces, sizeof(two_pieces), 3},
               {unpacked_first, sizeof(unpacked_first), 2},
               {ragged, sizeof(ragged), (size_t)-1},
               {then_ahead, sizeof(then_ahead), 1},
               {wrong_type, sizeof(wrong_type), (size_t)-1},
               {long_tag, sizeof(long_tag), (size_t)-2},
               {six_byte_tag, sizeof(six_byte_tag), (size_t)-2}};
  uint8_t body[256];
  for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
    size_t len = contribute_body(&c, cases[k].b, cases[k].n, body);
    Sbn__Envelope *t = decode_both(&a, body, len);
    if (cases[k].want == (size_t)-2)
      continue; /* whatever protobuf-c makes of it, the same both ways */
    if (cases[k].want == (size_t)-1) {
      ck_assert_msg(t == NULL, "case %zu decoded", k);
      continue;
    }
    ck_assert_msg(t != NULL, "case %zu refused", k);
    ck_assert_uint_eq(t->contribute->n_fvals, cases[k].want);
    ck_assert(t->contribute->fvals[0] == 1.0f && t->contribute->fvals[cases[k].want - 1] ==
                                                     (cases[k].want == 3 ? 3.0f : cases[k].want));
    /* Every cut of the body decodes alike both ways (or fails both ways). */
    for (size_t cut = 0; cut < len; cut++)
      decode_both(&a, body, cut);
    sbn__arena_reset(&a);
  }
  sbn__arena_release(&a);
}
END_TEST

/* The frame limit holds at its edge; other bodies and fields are refused. */
START_TEST(raw_tail_limits) {
  Sbn__Contribute c = SBN__CONTRIBUTE__INIT;
  Sbn__Envelope env = SBN__ENVELOPE__INIT;
  c.phase = SBN__PHASE__PHASE_ALLREDUCE;
  c.layer = "allreduce";
  env.body_case = SBN__ENVELOPE__BODY_CONTRIBUTE;
  env.contribute = &c;
  size_t prefix = 0, body = 0, tail = 1000 * sizeof(float);
  ck_assert_int_eq(sbn__msg_tail_prefix(&env, SBN_MSG_CONTRIBUTE_FVALS, tail, SBN_MAX_FRAME_CEILING,
                                        NULL, 0, &prefix, &body),
                   SBN_OK);
  uint32_t exact = (uint32_t)body;
  ck_assert_int_eq(
      sbn__msg_tail_prefix(&env, SBN_MSG_CONTRIBUTE_FVALS, tail, exact, NULL, 0, &prefix, &body),
      SBN_OK);
  ck_assert_int_eq(sbn__msg_tail_prefix(&env, SBN_MSG_CONTRIBUTE_FVALS, tail, exact - 1, NULL, 0,
                                        &prefix, &body),
                   SBN_ETOOBIG);
  ck_assert_uint_eq(body, exact); /* the size is reported for the message */
  /* The wrong field, a field already set, a body without it, a short buffer. */
  uint8_t buf[16];
  ck_assert_int_eq(
      sbn__msg_tail_prefix(&env, SBN_MSG_RESULT_FVALS, tail, exact, NULL, 0, &prefix, &body),
      SBN_EINVAL);
  float one = 1;
  c.n_fvals = 1;
  c.fvals = &one;
  ck_assert_int_eq(
      sbn__msg_tail_prefix(&env, SBN_MSG_CONTRIBUTE_FVALS, tail, exact, NULL, 0, &prefix, &body),
      SBN_EINVAL);
  c.n_fvals = 0;
  ck_assert_int_eq(sbn__msg_tail_prefix(&env, SBN_MSG_CONTRIBUTE_FVALS, tail, exact, buf,
                                        sizeof(buf), &prefix, &body),
                   SBN_EINVAL);
  Sbn__Ping ping = SBN__PING__INIT;
  Sbn__Envelope penv = SBN__ENVELOPE__INIT;
  penv.body_case = SBN__ENVELOPE__BODY_PING;
  penv.ping = &ping;
  ck_assert_int_eq(
      sbn__msg_tail_prefix(&penv, SBN_MSG_CONTRIBUTE_FVALS, tail, exact, NULL, 0, &prefix, &body),
      SBN_EINVAL);
}
END_TEST

int main(void) {
  Suite *s = suite_create("frame");
  TCase *tc = tcase_create("decoder");
  tcase_add_test(tc, header_round_trip);
  tcase_add_test(tc, partial_frame);
  tcase_add_test(tc, split_at_every_byte);
  tcase_add_test(tc, several_frames_in_one_feed);
  tcase_add_test(tc, bad_magic);
  tcase_add_test(tc, wrong_version);
  tcase_add_test(tc, nonzero_flags);
  tcase_add_test(tc, oversized_rejected_at_header);
  tcase_add_test(tc, errors_are_sticky);
  tcase_add_test(tc, bad_bodies);
  tcase_add_test(tc, encode_too_big);
  tcase_add_test(tc, raw_tail_decodes_alike);
  tcase_add_test(tc, raw_tail_decodes_in_place);
  tcase_add_test(tc, raw_tail_limits);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
