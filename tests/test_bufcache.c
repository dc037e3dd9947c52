/*
 * test_bufcache.c - the tensor buffer cache: large buffers are reused for the
 * same size, new tensors are still zero-filled, the byte limit holds, small
 * buffers are never cached, trim and limit 0 give everything back.
 */
#include <check.h>
#include <string.h>

#include "sbn/sbn.h"
#include "workers.h"

#define MIB (1024u * 1024u)

static sbn_tensor *make(size_t floats) {
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_new(1, &floats, &t), SBN_OK);
  return t;
}

START_TEST(test_reuse_and_zero) {
  sbn_tensor_cache_set_limit(64 * MIB);
  sbn_tensor_cache_trim();
  sbn_tensor *a = make(MIB / 4); /* 1 MiB */
  float *pa = sbn_tensor_data(a);
  memset(pa, 0xAB, MIB);
  sbn_tensor_free(a);
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), MIB);
  sbn_tensor *b = make(MIB / 4);
  ck_assert_ptr_eq(sbn_tensor_data(b), pa); /* the same buffer came back */
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 0);
  const float *d = sbn_tensor_cdata(b);
  for (size_t i = 0; i < MIB / 4; i++)
    ck_assert_msg(d[i] == 0.0f, "element %zu of a new tensor is not zero", i);
  /* Another size does not take it. */
  sbn_tensor_free(b);
  sbn_tensor *c = make(MIB / 4 + 1);
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), MIB);
  sbn_tensor_free(c);
  sbn_tensor_cache_trim();
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 0);
}
END_TEST

START_TEST(test_limits) {
  sbn_tensor_cache_trim();
  sbn_tensor_cache_set_limit(2 * MIB);
  sbn_tensor *t[3] = {make(MIB / 4), make(MIB / 4), make(MIB / 4)};
  for (int i = 0; i < 3; i++)
    sbn_tensor_free(t[i]);
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 2 * MIB); /* the oldest was dropped */
  /* A buffer larger than the whole limit is never kept. */
  sbn_tensor_free(make(MIB)); /* 4 MiB */
  ck_assert_uint_le(sbn_tensor_cache_bytes(), 2 * MIB);
  /* Below 64 KiB nothing is cached. */
  sbn_tensor_cache_trim();
  sbn_tensor_free(make(1000));
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 0);
  /* 64 KiB exactly is. */
  sbn_tensor_free(make(16 * 1024));
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 64 * 1024);
  sbn_tensor_cache_set_limit(0);
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 0);
  sbn_tensor_free(make(MIB / 4));
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 0);
}
END_TEST

START_TEST(test_finalize_trims) {
  sbn_tensor_cache_set_limit(64 * MIB);
  sbn_tensor_free(make(MIB / 4));
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), MIB);
  sbn_config cfg;
  sbn_config_init(&cfg);
  sbn_ctx *ctx;
  ck_assert_int_eq(sbn_init(&cfg, &ctx), SBN_OK);
  ck_assert_int_eq(sbn_finalize(ctx), SBN_OK);
  ck_assert_uint_eq(sbn_tensor_cache_bytes(), 0);
}
END_TEST

int main(void) {
  Suite *s = suite_create("bufcache");
  TCase *tc = tcase_create("bufcache");
  tcase_add_test(tc, test_reuse_and_zero);
  tcase_add_test(tc, test_limits);
  tcase_add_test(tc, test_finalize_trims);
  suite_add_tcase(s, tc);
  return run_suite(s);
}
