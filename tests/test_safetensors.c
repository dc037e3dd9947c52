/*
 * test_safetensors.c - saving and loading state dicts as safetensors
 * (client/src/safetensors.c): round trips of a model, a fixture written by
 * numpy (tests/data/gen_safetensors.py), every kind of malformed file (each a
 * clear error that names the file and leaves the module unchanged), save
 * failures, and a bounded fuzz loop over mutations of a valid file.
 *
 * Set SBN_TEST_SAFETENSORS_OUT=path to keep a copy of the round-trip file,
 * e.g. for `gen_safetensors.py --check path`.
 */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sbn/sbn.h"
#include "workers.h"

#define FIXTURE SBN_TEST_DATA_DIR "/bn_model.safetensors"
#define FUZZ_ITERATIONS 2000
#define FUZZ_SEED 0x5eed5afe7e750000ull
#define PATH_MAX_LEN 512
/* Room for tmpdir plus a file name. */
#define PATH_BUF_LEN (PATH_MAX_LEN + 128)

/* ---- helpers ------------------------------------------------------------------ */

static char tmpdir[PATH_MAX_LEN];

static void make_tmpdir(void) {
  const char *base = getenv("TMPDIR");
  snprintf(tmpdir, sizeof(tmpdir), "%s/sbn-st-XXXXXX", base && *base ? base : "/tmp");
  ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void remove_tmpdir(void) {
  char cmd[PATH_MAX_LEN + 16];
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
  ck_assert_int_eq(system(cmd), 0);
}

static const char *tmp_path(const char *name) {
  static char buf[4][PATH_BUF_LEN];
  static int next;
  char *p = buf[next++ % 4];
  snprintf(p, PATH_BUF_LEN, "%.*s/%s", PATH_MAX_LEN, tmpdir, name);
  return p;
}

static void write_bytes(const char *path, const void *data, size_t n) {
  FILE *f = fopen(path, "wb");
  ck_assert_ptr_nonnull(f);
  ck_assert_uint_eq(fwrite(data, 1, n, f), n);
  ck_assert_int_eq(fclose(f), 0);
}

static uint8_t *read_bytes(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  ck_assert_ptr_nonnull(f);
  ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
  long len = ftell(f);
  ck_assert_int_ge(len, 0);
  rewind(f);
  uint8_t *b = malloc((size_t)len + 1);
  ck_assert_ptr_nonnull(b);
  ck_assert_uint_eq(fread(b, 1, (size_t)len, f), (size_t)len);
  fclose(f);
  *n = (size_t)len;
  return b;
}

/* A safetensors file from a header string and data bytes. */
static void write_st(const char *path, const char *header, const void *data, size_t n) {
  size_t hl = strlen(header), total = 8 + hl + n;
  uint8_t *b = malloc(total);
  ck_assert_ptr_nonnull(b);
  for (int i = 0; i < 8; i++)
    b[i] = (uint8_t)((uint64_t)hl >> (8 * i));
  memcpy(b + 8, header, hl);
  if (n)
    memcpy(b + 8 + hl, data, n);
  write_bytes(path, b, total);
  free(b);
}

static sbn_module *bn(size_t C, int sync, int affine) {
  sbn_bn_options o;
  sbn_bn_options_init(&o, C);
  o.affine = affine;
  o.group = NULL; /* a SyncBatchNorm without a group is local */
  sbn_module *m;
  ck_assert_int_eq(sync ? sbn_syncbatchnorm_new(&o, &m) : sbn_batchnorm_new(&o, &m), SBN_OK);
  return m;
}

/* Sequential(BatchNorm(4), SyncBatchNorm(3), BatchNorm(2, affine=False)). */
static sbn_module *make_model(void) {
  sbn_module *layers[3] = {bn(4, 0, 1), bn(3, 1, 1), bn(2, 0, 0)};
  sbn_module *seq;
  ck_assert_int_eq(sbn_sequential_new(layers, 3, &seq), SBN_OK);
  for (int i = 0; i < 3; i++)
    sbn_module_free(layers[i]);
  return seq;
}

static const char *const MODEL_KEYS[] = {
    "0.bias",         "0.running_mean", "0.running_var", "0.weight",       "1.bias",
    "1.running_mean", "1.running_var",  "1.weight",      "2.running_mean", "2.running_var"};
#define MODEL_NKEYS (sizeof(MODEL_KEYS) / sizeof(MODEL_KEYS[0]))

/* Fills every tensor of m with values unlike the defaults (signs, tiny and
 * huge magnitudes, -0, a subnormal), different for each seed. */
static void fill_model(sbn_module *m, unsigned seed) {
  sbn_state_dict sd;
  ck_assert_int_eq(sbn_module_state_dict(m, NULL, 1, &sd), SBN_OK);
  for (size_t k = 0; k < sd.count; k++) {
    float *d = sbn_tensor_data(sd.values[k]);
    for (size_t i = 0; i < sbn_tensor_numel(sd.values[k]); i++) {
      double v = sin(1.0 + seed * 7.0 + k * 3.1 + i * 0.7) * pow(10.0, (double)((k + i) % 9) - 4);
      d[i] = (float)v;
    }
    if (k == 0)
      d[0] = -0.0f;
    if (k == 1)
      d[1] = 1e-40f; /* subnormal */
  }
  sbn_state_dict_release(&sd);
}

/* A copy of m's state, to compare against later. */
static void snapshot(sbn_module *m, sbn_state_dict *sd) {
  ck_assert_int_eq(sbn_module_state_dict(m, NULL, 0, sd), SBN_OK);
}

/* True when m's state is bitwise the snapshot. */
static int same_state(sbn_module *m, const sbn_state_dict *snap) {
  sbn_state_dict now;
  int same = 1;
  ck_assert_int_eq(sbn_module_state_dict(m, NULL, 1, &now), SBN_OK);
  if (now.count != snap->count)
    same = 0;
  for (size_t i = 0; same && i < now.count; i++) {
    same = strcmp(now.keys[i], snap->keys[i]) == 0 &&
           sbn_tensor_same_shape(now.values[i], snap->values[i]) &&
           memcmp(sbn_tensor_cdata(now.values[i]), sbn_tensor_cdata(snap->values[i]),
                  sbn_tensor_numel(now.values[i]) * sizeof(float)) == 0;
  }
  sbn_state_dict_release(&now);
  return same;
}

/* Expects loading path into a fresh model to fail with code, a message that
 * names the file and contains want, and no change to the model. */
static void expect_bad(const char *path, int code, const char *want) {
  sbn_module *m = make_model();
  fill_model(m, 3);
  sbn_state_dict snap, out = {0};
  snapshot(m, &snap);
  int rc = sbn_safetensors_load(m, path, 1);
  const char *msg = sbn_last_error();
  ck_assert_msg(rc == code, "load gave %d (%s), want %d (%s): %s", rc, sbn_strerror(rc), code,
                sbn_strerror(code), msg);
  ck_assert_msg(strstr(msg, path) != NULL, "message does not name the file: %s", msg);
  ck_assert_msg(strstr(msg, want) != NULL, "message lacks \"%s\": %s", want, msg);
  ck_assert_msg(same_state(m, &snap), "a failed load changed the model");
  /* The dict reader agrees, unless only the module is at fault. */
  if (code != SBN_EKEY) {
    int rc2 = sbn_safetensors_load_dict(path, &out);
    if (rc2 != SBN_OK) {
      ck_assert_int_eq(rc2, code);
      ck_assert_uint_eq(out.count, 0);
    }
    sbn_state_dict_release(&out);
  }
  sbn_state_dict_release(&snap);
  sbn_module_free(m);
}

/* ---- round trips --------------------------------------------------------------- */

START_TEST(test_round_trip_model) {
  make_tmpdir();
  const char *path = tmp_path("model.safetensors");
  sbn_module *a = make_model(), *b = make_model();
  fill_model(a, 1);
  ck_assert_int_eq(sbn_safetensors_save(a, path), SBN_OK);
  struct stat st;
  ck_assert_int_ne(stat(tmp_path("model.safetensors.tmp"), &st), 0); /* renamed away */

  /* The file itself: aligned data, our metadata, flat (C,) shapes. */
  size_t n;
  uint8_t *bytes = read_bytes(path, &n);
  uint64_t hl = 0;
  for (int i = 7; i >= 0; i--)
    hl = (hl << 8) | bytes[i];
  ck_assert_uint_eq((8 + hl) % 8, 0);
  ck_assert_uint_eq(n, 8 + hl + 4 * (4 * 4 + 4 * 3 + 2 * 2));
  char *header = strndup((const char *)bytes + 8, (size_t)hl);
  char producer[64];
  snprintf(producer, sizeof(producer), "\"producer\":\"sbn %s\"", sbn_version());
  ck_assert_ptr_nonnull(strstr(header, "\"__metadata__\":{\"format\":\"pt\""));
  ck_assert_ptr_nonnull(strstr(header, producer));
  ck_assert_ptr_nonnull(
      strstr(header, "\"1.weight\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[100,112]}"));
  free(header);
  const char *keep = getenv("SBN_TEST_SAFETENSORS_OUT");
  if (keep && *keep)
    write_bytes(keep, bytes, n);
  free(bytes);

  /* Load into a model with other values: bitwise the saved state. */
  fill_model(b, 2);
  sbn_state_dict want;
  snapshot(a, &want);
  ck_assert_int_eq(sbn_safetensors_load(b, path, 1), SBN_OK);
  ck_assert(same_state(b, &want));

  /* The dict reader gives the state dict's keys, order and shapes. */
  sbn_state_dict got;
  ck_assert_int_eq(sbn_safetensors_load_dict(path, &got), SBN_OK);
  ck_assert_uint_eq(got.count, MODEL_NKEYS);
  for (size_t i = 0; i < got.count; i++) {
    ck_assert_str_eq(got.keys[i], MODEL_KEYS[i]);
    ck_assert_str_eq(got.keys[i], want.keys[i]);
    ck_assert_int_eq(sbn_tensor_ndim(got.values[i]), 1);
    ck_assert(sbn_tensor_same_shape(got.values[i], want.values[i]));
  }
  /* Saving the loaded dict gives the same bytes. */
  ck_assert_int_eq(sbn_safetensors_save_dict(&got, tmp_path("again.safetensors")), SBN_OK);
  size_t n1, n2;
  uint8_t *b1 = read_bytes(path, &n1), *b2 = read_bytes(tmp_path("again.safetensors"), &n2);
  ck_assert_uint_eq(n1, n2);
  ck_assert_int_eq(memcmp(b1, b2, n1), 0);
  free(b1);
  free(b2);

  /* Saving over an existing file replaces it whole. */
  fill_model(a, 5);
  ck_assert_int_eq(sbn_safetensors_save(a, path), SBN_OK);
  sbn_state_dict_release(&want);
  snapshot(a, &want);
  ck_assert_int_eq(sbn_safetensors_load(b, path, 1), SBN_OK);
  ck_assert(same_state(b, &want));

  sbn_state_dict_release(&got);
  sbn_state_dict_release(&want);
  sbn_module_free(a);
  sbn_module_free(b);
  remove_tmpdir();
}
END_TEST

START_TEST(test_round_trip_dict_edge_cases) {
  make_tmpdir();
  const char *path = tmp_path("dict.safetensors");
  /* Keys that need escaping, an empty tensor, 5 dimensions. */
  const char *keys[] = {"a \"quoted\" key",
                        "back\\slash",
                        "new\nline\t",
                        "caf\xc3\xa9.\xf0\x9d\x95\x8a",
                        "empty",
                        "five.d"};
  size_t shapes[][5] = {{3}, {2, 2}, {1}, {2}, {0}, {1, 2, 1, 3, 2}};
  int ndims[] = {1, 2, 1, 1, 1, 5};
  sbn_state_dict sd, got;
  sbn_state_dict_init(&sd);
  for (size_t k = 0; k < 6; k++) {
    sbn_tensor *t;
    ck_assert_int_eq(sbn_tensor_new(ndims[k], shapes[k], &t), SBN_OK);
    for (size_t i = 0; i < sbn_tensor_numel(t); i++)
      sbn_tensor_data(t)[i] = (float)(k * 10 + i) - 7.5f;
    ck_assert_int_eq(sbn_state_dict_set(&sd, keys[k], t), SBN_OK);
    sbn_tensor_free(t);
  }
  ck_assert_int_eq(sbn_safetensors_save_dict(&sd, path), SBN_OK);
  ck_assert_int_eq(sbn_safetensors_load_dict(path, &got), SBN_OK);
  ck_assert_uint_eq(got.count, 6);
  for (size_t k = 0; k < 6; k++) {
    sbn_tensor *t = sbn_state_dict_get(&got, keys[k]);
    ck_assert_msg(t != NULL, "key %zu lost", k);
    ck_assert(sbn_tensor_same_shape(t, sd.values[k]));
    if (sbn_tensor_numel(t))
      ck_assert_int_eq(memcmp(sbn_tensor_cdata(t), sbn_tensor_cdata(sd.values[k]),
                              sbn_tensor_numel(t) * sizeof(float)),
                       0);
  }
  sbn_state_dict_release(&got);
  sbn_state_dict_release(&sd);

  /* An empty state dict is a file with only metadata. */
  sbn_state_dict_init(&sd);
  ck_assert_int_eq(sbn_safetensors_save_dict(&sd, path), SBN_OK);
  ck_assert_int_eq(sbn_safetensors_load_dict(path, &got), SBN_OK);
  ck_assert_uint_eq(got.count, 0);
  sbn_state_dict_release(&got);

  /* Hand-written: a scalar loads as (1,), whitespace anywhere, no metadata. */
  float vals[2] = {2.5f, -1.0f};
  write_st(path,
           " {\n \"s\" : { \"shape\" : [ ] , \"data_offsets\" : [ 0 , 4 ] , \"dtype\" : \"F32\" } ,"
           "\"v\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}   ",
           vals, sizeof(vals));
  ck_assert_int_eq(sbn_safetensors_load_dict(path, &got), SBN_EINVAL); /* must begin with '{' */
  write_st(path,
           "{\n \"s\" : { \"shape\" : [ ] , \"data_offsets\" : [ 0 , 4 ] , \"dtype\" : \"F32\" } ,"
           "\"v\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}   ",
           vals, sizeof(vals));
  ck_assert_int_eq(sbn_safetensors_load_dict(path, &got), SBN_OK);
  ck_assert_uint_eq(got.count, 2);
  ck_assert_int_eq(sbn_tensor_ndim(sbn_state_dict_get(&got, "s")), 1);
  ck_assert_uint_eq(sbn_tensor_dim(sbn_state_dict_get(&got, "s"), 0), 1);
  ck_assert(sbn_tensor_cdata(sbn_state_dict_get(&got, "s"))[0] == 2.5f);
  ck_assert(sbn_tensor_cdata(sbn_state_dict_get(&got, "v"))[0] == -1.0f);
  sbn_state_dict_release(&got);
  remove_tmpdir();
}
END_TEST

/* ---- the numpy fixture ------------------------------------------------------------ */

START_TEST(test_numpy_fixture) {
  sbn_state_dict sd;
  ck_assert_msg(sbn_safetensors_load_dict(FIXTURE, &sd) == SBN_OK, "%s", sbn_last_error());
  ck_assert_uint_eq(sd.count, MODEL_NKEYS);
  for (size_t k = 0; k < MODEL_NKEYS; k++) {
    sbn_tensor *t = sbn_state_dict_get(&sd, MODEL_KEYS[k]);
    ck_assert_msg(t != NULL, "no key '%s'", MODEL_KEYS[k]);
    size_t C = MODEL_KEYS[k][0] == '0' ? 4 : MODEL_KEYS[k][0] == '1' ? 3 : 2;
    ck_assert_uint_eq(sbn_tensor_numel(t), C);
    if (strcmp(MODEL_KEYS[k], "1.weight") == 0) {
      /* Stored MegEngine-style as (1, 3, 1, 1). */
      ck_assert_int_eq(sbn_tensor_ndim(t), 4);
      ck_assert_uint_eq(sbn_tensor_dim(t, 1), 3);
    } else {
      ck_assert_int_eq(sbn_tensor_ndim(t), 1);
    }
    for (size_t i = 0; i < C; i++)
      ck_assert_msg(sbn_tensor_cdata(t)[i] == (float)(k + 1) + 0.125f * (float)i, "%s[%zu] = %g",
                    MODEL_KEYS[k], i, sbn_tensor_cdata(t)[i]);
  }
  /* The data order of the file, not its header's: "1.weight" comes first. */
  ck_assert_str_eq(sd.keys[0], "1.weight");
  sbn_state_dict_release(&sd);

  /* Into the model, strictly: every key used, (1, 3, 1, 1) flattened. */
  sbn_module *m = make_model();
  ck_assert_msg(sbn_safetensors_load(m, FIXTURE, 1) == SBN_OK, "%s", sbn_last_error());
  sbn_tensor *w = sbn_module_get_tensor(m, "1.weight");
  ck_assert_int_eq(sbn_tensor_ndim(w), 1);
  ck_assert(sbn_tensor_cdata(w)[2] == 8.25f);
  ck_assert(sbn_tensor_cdata(sbn_module_get_tensor(m, "2.running_var"))[1] == 10.125f);
  sbn_module_free(m);
}
END_TEST

/* ---- malformed files ---------------------------------------------------------------- */

/* A valid header for the model with "0.bias" described by desc0 and the
 * rest as sbn writes them; data sized for the model. */
static void write_model_variant(const char *path, const char *desc0, size_t data_bytes) {
  char header[2048];
  size_t o = (size_t)snprintf(header, sizeof(header), "{\"0.bias\":%s", desc0);
  size_t sizes[] = {4, 4, 4, 4, 3, 3, 3, 3, 2, 2};
  size_t at = 16;
  for (size_t k = 1; k < MODEL_NKEYS; k++) {
    o += (size_t)snprintf(header + o, sizeof(header) - o,
                          ",\"%s\":{\"dtype\":\"F32\",\"shape\":[%zu],\"data_offsets\":[%zu,%zu]}",
                          MODEL_KEYS[k], sizes[k], at, at + 4 * sizes[k]);
    at += 4 * sizes[k];
  }
  snprintf(header + o, sizeof(header) - o, "}");
  uint8_t *data = calloc(1, data_bytes + 1);
  write_st(path, header, data, data_bytes);
  free(data);
}

#define MODEL_DATA_BYTES (4 * (4 * 4 + 4 * 3 + 2 * 2))

START_TEST(test_malformed_files) {
  make_tmpdir();
  const char *path = tmp_path("bad.safetensors");
  char msg[256];

  /* Sanity: the variant writer makes a loadable file. */
  write_model_variant(path, "{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}",
                      MODEL_DATA_BYTES);
  sbn_module *m = make_model();
  ck_assert_msg(sbn_safetensors_load(m, path, 1) == SBN_OK, "%s", sbn_last_error());
  sbn_module_free(m);

  /* Missing and not a file. */
  expect_bad(tmp_path("missing.safetensors"), SBN_EIO, "cannot open");
  expect_bad(tmpdir, SBN_EINVAL, "not a regular file");

  /* Shorter than the length field; header length past the file; over the limit. */
  write_bytes(path, "\x10\x00\x00", 3);
  expect_bad(path, SBN_EINVAL, "too short");
  write_st(path, "{}", NULL, 0);
  size_t n;
  uint8_t *b = read_bytes(path, &n);
  b[0] = 200; /* 200-byte header, 2 bytes present */
  write_bytes(path, b, n);
  expect_bad(path, SBN_EINVAL, "header length 200 exceeds the 2 bytes after it");
  b[0] = 0, b[5] = 1; /* 2^40 */
  write_bytes(path, b, n);
  expect_bad(path, SBN_ETOOBIG, "exceeds the limit of 100000000 bytes");
  free(b);

  /* Bad JSON, with the offset named. */
  write_st(path, "{\"0.bias\":{\"dtype\":\"F32\" \"shape\":[4]}}", NULL, 0);
  expect_bad(path, SBN_EINVAL,
             "bad safetensors header at byte 25 (file offset 33): expected ',' or '}'");
  static const struct {
    const char *header, *want;
  } json[] = {
      {"", "must begin with '{'"},
      {"[]", "must begin with '{'"},
      {"{", "unexpected end of the header"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],}}", "expected '\"'"},
      {"{\"a\":1}", "expected '{'"},
      {"{\"a\":{\"dtype\":true}}", "expected '\"'"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[[1]],\"data_offsets\":[0,4]}}",
       "non-negative integer"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", "non-negative integer"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}",
       "fraction or exponent"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1e0],\"data_offsets\":[0,4]}}",
       "fraction or exponent"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", "leading zero"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,4]}}",
       "integer too large"},
      {"{\"a", "unterminated string"},
      {"{\"a\\q\":{}}", "invalid escape"},
      {"{\"a\\u12\":{}}", "invalid \\u escape"},
      {"{\"a\\udc00\":{}}", "lone low surrogate"},
      {"{\"a\\ud800x\":{}}", "high surrogate without a low one"},
      {"{\"a\\u0000\":{}}", "\\u0000 in a string"},
      {"{\"a\tb\":{}}", "control character"},
      {"{\"a\xff\":{}}", "invalid UTF-8"},
      {"{\"a\xc0\x80\":{}}", "invalid UTF-8"},
      {"{\"a\":{}}", "empty tensor description"},
      {"{\"\":{\"dtype\":\"F32\"}}", "empty tensor name"},
      {"{} x", "data after the header's object"},
      {"{}}", "data after the header's object"},
      {"{\"__metadata__\":{\"a\":1}}", "metadata values must be strings"},
      {"{\"__metadata__\":{},\"__metadata__\":{}}", "second \"__metadata__\""},
      {"{\"__metadata__\":[]}", "expected '{'"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}",
       "tensor 'a' has an unknown field 'x'"},
      {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
       "tensor 'a' has field 'dtype' twice"},
      {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", "tensor 'a' has no shape"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}",
       "has 1 data_offsets, not 2"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}",
       "more than 2 data_offsets"},
  };
  for (size_t i = 0; i < sizeof(json) / sizeof(json[0]); i++) {
    write_st(path, json[i].header, "\0\0\0\0", 4);
    expect_bad(path, SBN_EINVAL, json[i].want);
  }

  /* Wrong dtype, named with its key. */
  write_model_variant(path, "{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,16]}",
                      MODEL_DATA_BYTES);
  expect_bad(path, SBN_EINVAL, "tensor '0.bias' has dtype 'F16', only F32 is supported");
  write_model_variant(path, "{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}",
                      MODEL_DATA_BYTES);
  expect_bad(path, SBN_EINVAL, "has dtype 'I64'");

  /* Offsets: overlapping, past the end, reversed, a hole, trailing bytes. */
  write_st(path,
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
           "123456789abc", 12);
  expect_bad(path, SBN_EINVAL, "tensors 'a' and 'b' overlap (data_offsets [0, 8] and [4, 12])");
  write_model_variant(path, "{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}",
                      MODEL_DATA_BYTES - 4);
  snprintf(msg, sizeof(msg),
           "tensor '2.running_var' has data_offsets [120, 128] past the end of "
           "the data (124 bytes)");
  expect_bad(path, SBN_EINVAL, msg);
  write_model_variant(path, "{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[16,0]}",
                      MODEL_DATA_BYTES);
  expect_bad(path, SBN_EINVAL, "end before they begin");
  write_st(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", "12345678", 8);
  expect_bad(path, SBN_EINVAL, "4 bytes of data before tensor 'a' belong to no tensor");
  write_st(path, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "12345678", 8);
  expect_bad(path, SBN_EINVAL, "4 bytes after the last tensor belong to no tensor");
  write_st(path,
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
           "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
           "12345678", 8);
  expect_bad(path, SBN_EINVAL, "tensor 'a' appears twice");

  /* Shape and size disagree; too many dimensions; an absurd shape. */
  write_model_variant(path, "{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}",
                      MODEL_DATA_BYTES);
  expect_bad(path, SBN_ESHAPE,
             "tensor '0.bias' has shape [3] (12 bytes of F32) but data_offsets [0, 16] (16 bytes)");
  write_model_variant(path, "{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,4],\"data_offsets\":[0,16]}",
                      MODEL_DATA_BYTES);
  expect_bad(path, SBN_ESHAPE, "tensor '0.bias' has more than 5 dimensions");
  write_model_variant(
      path, "{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,16]}",
      MODEL_DATA_BYTES);
  expect_bad(path, SBN_ESHAPE, "(too many bytes of F32)");

  /* Well-formed, but not this model's: the module's own checks, file named. */
  write_model_variant(path, "{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}",
                      MODEL_DATA_BYTES);
  m = make_model();
  ck_assert_int_eq(sbn_safetensors_load(m, path, 1), SBN_OK); /* BN loads any shape of C elements */
  sbn_module_free(m);
  write_model_variant(path, "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}",
                      MODEL_DATA_BYTES - 8);
  expect_bad(path, SBN_EINVAL, "past the end"); /* offsets of the others now wrong */
  write_st(path,
           "{\"0.bias\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"extra\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
           "123456789abc", 12);
  expect_bad(path, SBN_ESHAPE, "0.bias");
  write_st(path, "{\"extra\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "1234", 4);
  expect_bad(path, SBN_EKEY, "extra");
  m = make_model();
  sbn_state_dict snap;
  snapshot(m, &snap);
  ck_assert_int_eq(sbn_safetensors_load(m, path, 0), SBN_OK); /* not strict: ignored */
  ck_assert(same_state(m, &snap));
  sbn_state_dict_release(&snap);
  sbn_module_free(m);
  remove_tmpdir();
}
END_TEST

/* ---- save failures ------------------------------------------------------------------ */

START_TEST(test_save_failures) {
  make_tmpdir();
  sbn_module *m = make_model();
  fill_model(m, 4);
  const char *nodir = tmp_path("no/such/dir/model.safetensors");
  ck_assert_int_eq(sbn_safetensors_save(m, nodir), SBN_EIO);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), nodir));
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "No such file or directory"));

  /* A failed save leaves the previous file as it was and no temporary file. */
  const char *path = tmp_path("keep.safetensors");
  ck_assert_int_eq(sbn_safetensors_save(m, path), SBN_OK);
  size_t n0, n1;
  uint8_t *before = read_bytes(path, &n0);
  ck_assert_int_eq(mkdir(tmp_path("keep.safetensors.tmp"), 0700), 0); /* blocks the temp file */
  fill_model(m, 6);
  ck_assert_int_eq(sbn_safetensors_save(m, path), SBN_EIO);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "keep.safetensors.tmp"));
  uint8_t *after = read_bytes(path, &n1);
  ck_assert_uint_eq(n0, n1);
  ck_assert_int_eq(memcmp(before, after, n0), 0);
  free(before);
  free(after);
  rmdir(tmp_path("keep.safetensors.tmp"));

  /* Keys the format cannot hold. */
  sbn_state_dict sd;
  sbn_state_dict_init(&sd);
  size_t one = 1;
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_new(1, &one, &t), SBN_OK);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "__metadata__", t), SBN_OK);
  ck_assert_int_eq(sbn_safetensors_save_dict(&sd, tmp_path("k.safetensors")), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "reserved"));
  sbn_state_dict_release(&sd);
  sbn_state_dict_init(&sd);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "bad\xff", t), SBN_OK);
  ck_assert_int_eq(sbn_safetensors_save_dict(&sd, tmp_path("k.safetensors")), SBN_EINVAL);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "not valid UTF-8"));
  sbn_state_dict_release(&sd);
  sbn_state_dict_init(&sd);
  ck_assert_int_eq(sbn_state_dict_set(&sd, "", t), SBN_OK);
  ck_assert_int_eq(sbn_safetensors_save_dict(&sd, tmp_path("k.safetensors")), SBN_EINVAL);
  sbn_state_dict_release(&sd);
  sbn_tensor_free(t);
  struct stat st;
  ck_assert_int_ne(stat(tmp_path("k.safetensors"), &st), 0);

  /* NULL arguments. */
  ck_assert_int_eq(sbn_safetensors_save(NULL, path), SBN_EINVAL);
  ck_assert_int_eq(sbn_safetensors_save(m, NULL), SBN_EINVAL);
  ck_assert_int_eq(sbn_safetensors_load(NULL, path, 1), SBN_EINVAL);
  ck_assert_int_eq(sbn_safetensors_load(m, NULL, 1), SBN_EINVAL);
  ck_assert_int_eq(sbn_safetensors_save_dict(NULL, path), SBN_EINVAL);
  ck_assert_int_eq(sbn_safetensors_load_dict(path, NULL), SBN_EINVAL);
  sbn_module_free(m);
  remove_tmpdir();
}
END_TEST

/* ---- fuzz ---------------------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rng(void) {
  /* xorshift64*: deterministic, good enough to pick mutations. */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545F4914F6CDD1Dull;
}

START_TEST(test_fuzz_mutations) {
  make_tmpdir();
  const char *good = tmp_path("good.safetensors"), *path = tmp_path("fuzz.safetensors");
  sbn_module *m = make_model();
  fill_model(m, 7);
  ck_assert_int_eq(sbn_safetensors_save(m, good), SBN_OK);
  size_t n;
  uint8_t *orig = read_bytes(good, &n);
  uint8_t *buf = malloc(n * 2 + 64);
  sbn_state_dict snap;
  snapshot(m, &snap);
  static const char interesting[] = "{}[]\",:\\u0123456789-.eE \t\xff\x80";
  int ok = 0, failed = 0;
  rng_state = FUZZ_SEED;
  for (int it = 0; it < FUZZ_ITERATIONS; it++) {
    size_t len = n;
    memcpy(buf, orig, n);
    int nmut = 1 + (int)(rng() % 3);
    for (int k = 0; k < nmut && len > 0; k++) {
      size_t pos = rng() % len;
      switch (rng() % 6) {
      case 0: buf[pos] ^= (uint8_t)(1u << (rng() % 8)); break;
      case 1: buf[pos] = (uint8_t)interesting[rng() % (sizeof(interesting) - 1)]; break;
      case 2: len = pos; break; /* truncate */
      case 3:                   /* delete a byte */
        memmove(buf + pos, buf + pos + 1, len - pos - 1);
        len--;
        break;
      case 4: /* insert a byte */
        memmove(buf + pos + 1, buf + pos, len - pos);
        buf[pos] = (uint8_t)interesting[rng() % (sizeof(interesting) - 1)];
        len++;
        break;
      default: /* the header length */ buf[rng() % 8] = (uint8_t)rng(); break;
      }
    }
    write_bytes(path, buf, len);
    int rc = sbn_safetensors_load(m, path, (int)(it & 1));
    if (rc == SBN_OK) {
      ok++;
      /* A mutation of the data bytes: restore the reference state. */
      ck_assert_int_eq(sbn_module_load_state_dict(m, &snap, 1), SBN_OK);
    } else {
      failed++;
      ck_assert_msg(strstr(sbn_last_error(), path) != NULL, "iteration %d: %s", it,
                    sbn_last_error());
      ck_assert_msg(same_state(m, &snap), "iteration %d: a failed load changed the model", it);
    }
  }
  ck_assert_int_gt(ok, 0);
  ck_assert_int_gt(failed, FUZZ_ITERATIONS / 2);
  sbn_state_dict_release(&snap);
  free(buf);
  free(orig);
  sbn_module_free(m);
  remove_tmpdir();
}
END_TEST

int main(void) {
  Suite *s = suite_create("safetensors");
  TCase *tc = tcase_create("safetensors");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_round_trip_model);
  tcase_add_test(tc, test_round_trip_dict_edge_cases);
  tcase_add_test(tc, test_numpy_fixture);
  tcase_add_test(tc, test_malformed_files);
  tcase_add_test(tc, test_save_failures);
  tcase_add_test(tc, test_fuzz_mutations);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
