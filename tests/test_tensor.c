/* test_tensor.c - the float32 tensor: creation, views, refcounting, bad shapes. */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sbn/sbn.h"

START_TEST(test_new_is_zeroed) {
  size_t shape[3] = {2, 3, 4};
  sbn_tensor *t = NULL;
  ck_assert_int_eq(sbn_tensor_new(3, shape, &t), SBN_OK);
  ck_assert_int_eq(sbn_tensor_ndim(t), 3);
  ck_assert_uint_eq(sbn_tensor_numel(t), 24);
  ck_assert_uint_eq(sbn_tensor_dim(t, 1), 3);
  ck_assert_uint_eq(sbn_tensor_dim(t, 3), 0);
  ck_assert_uint_eq(sbn_tensor_dim(t, -1), 0);
  ck_assert(sbn_tensor_is_owner(t));
  for (size_t i = 0; i < 24; i++) ck_assert(sbn_tensor_data(t)[i] == 0.0f);
  ck_assert_ptr_null(sbn_tensor_grad(t));
  ck_assert(!sbn_tensor_is_parameter(t));
  char buf[64];
  ck_assert_str_eq(sbn_tensor_shape_str(t, buf, sizeof(buf)), "(2, 3, 4)");
  sbn_tensor_free(t);
}
END_TEST

START_TEST(test_from_data_copies) {
  float src[6] = {1, 2, 3, 4, 5, 6};
  size_t shape[2] = {2, 3};
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_from_data(2, shape, src, &t), SBN_OK);
  src[0] = 100;
  ck_assert(sbn_tensor_data(t)[0] == 1.0f);
  ck_assert(sbn_tensor_data(t)[5] == 6.0f);
  sbn_tensor *c;
  ck_assert_int_eq(sbn_tensor_clone(t, &c), SBN_OK);
  ck_assert_ptr_ne(sbn_tensor_data(c), sbn_tensor_data(t));
  ck_assert(memcmp(sbn_tensor_data(c), sbn_tensor_data(t), 6 * sizeof(float)) == 0);
  sbn_tensor_fill(c, 7.5f);
  ck_assert(sbn_tensor_data(c)[3] == 7.5f);
  ck_assert(sbn_tensor_data(t)[3] == 4.0f);
  ck_assert_int_eq(sbn_tensor_copy(c, t), SBN_OK);
  ck_assert(sbn_tensor_data(c)[3] == 4.0f);
  sbn_tensor_free(c);
  sbn_tensor_free(t);
}
END_TEST

START_TEST(test_view_shares_memory) {
  float buf[8] = {0};
  size_t shape[3] = {2, 2, 2};
  sbn_tensor *v;
  ck_assert_int_eq(sbn_tensor_view(3, shape, buf, &v), SBN_OK);
  ck_assert(!sbn_tensor_is_owner(v));
  ck_assert_ptr_eq(sbn_tensor_data(v), buf);
  sbn_tensor_fill(v, 2.0f);
  ck_assert(buf[7] == 2.0f);
  buf[0] = -1;
  ck_assert(sbn_tensor_cdata(v)[0] == -1.0f);
  sbn_tensor_free(v); /* must not free buf (ASan would catch it) */
  ck_assert(buf[1] == 2.0f);
  /* NULL data only for an empty view. */
  size_t empty[2] = {0, 4};
  ck_assert_int_eq(sbn_tensor_view(2, empty, NULL, &v), SBN_OK);
  ck_assert_uint_eq(sbn_tensor_numel(v), 0);
  sbn_tensor_free(v);
  v = NULL;
  ck_assert_int_eq(sbn_tensor_view(3, shape, NULL, &v), SBN_EINVAL);
  ck_assert_ptr_null(v);
}
END_TEST

START_TEST(test_refcount) {
  size_t n = 4;
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_new(1, &n, &t), SBN_OK);
  ck_assert_int_eq(sbn_tensor_refcount(t), 1);
  ck_assert_ptr_eq(sbn_tensor_ref(t), t);
  ck_assert_int_eq(sbn_tensor_refcount(t), 2);
  sbn_tensor_free(t);
  ck_assert_int_eq(sbn_tensor_refcount(t), 1);
  /* replace: the slot takes the new reference, drops the old. */
  sbn_tensor *u, *slot;
  ck_assert_int_eq(sbn_tensor_new(1, &n, &u), SBN_OK);
  slot = sbn_tensor_ref(t);
  ck_assert_int_eq(sbn_tensor_refcount(t), 2);
  sbn_tensor_replace(&slot, sbn_tensor_ref(u));
  ck_assert_int_eq(sbn_tensor_refcount(t), 1);
  ck_assert_int_eq(sbn_tensor_refcount(u), 2);
  ck_assert_ptr_eq(slot, u);
  /* Replacing a slot's tensor by itself keeps the count right. */
  sbn_tensor_replace(&slot, sbn_tensor_ref(u));
  ck_assert_int_eq(sbn_tensor_refcount(u), 2);
  sbn_tensor_free(slot);
  ck_assert_int_eq(sbn_tensor_refcount(u), 1);
  sbn_tensor_free(u);
  sbn_tensor_free(t);
  sbn_tensor_free(NULL);
  ck_assert_ptr_null(sbn_tensor_ref(NULL));
}
END_TEST

START_TEST(test_grad_slot) {
  size_t shape[2] = {2, 3};
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_new(2, shape, &t), SBN_OK);
  ck_assert_int_eq(sbn_tensor_require_grad(t), SBN_OK);
  sbn_tensor *g = sbn_tensor_grad(t);
  ck_assert_ptr_nonnull(g);
  ck_assert(sbn_tensor_same_shape(g, t));
  ck_assert_ptr_ne(sbn_tensor_data(g), sbn_tensor_data(t));
  ck_assert_int_eq(sbn_tensor_require_grad(t), SBN_OK);
  ck_assert_ptr_eq(sbn_tensor_grad(t), g); /* idempotent */
  size_t flat = 6;
  ck_assert_int_eq(sbn_tensor_reshape(t, 1, &flat), SBN_OK);
  ck_assert_int_eq(sbn_tensor_ndim(g), 1);
  ck_assert_uint_eq(sbn_tensor_dim(g, 0), 6);
  sbn_tensor_free(t);
}
END_TEST

START_TEST(test_bad_shapes) {
  size_t shape[6] = {1, 2, 3, 4, 5, 6};
  sbn_tensor *t = NULL;
  ck_assert_int_eq(sbn_tensor_new(0, shape, &t), SBN_ESHAPE);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "rank 0"));
  ck_assert_int_eq(sbn_tensor_new(6, shape, &t), SBN_ESHAPE);
  ck_assert_ptr_nonnull(strstr(sbn_last_error(), "rank 6"));
  ck_assert_ptr_null(t);
  size_t huge[2] = {SIZE_MAX / 2, 4};
  ck_assert_int_eq(sbn_tensor_new(2, huge, &t), SBN_ESHAPE);
  ck_assert_int_eq(sbn_tensor_new(2, NULL, &t), SBN_EINVAL);
  ck_assert_int_eq(sbn_tensor_new(2, shape, NULL), SBN_EINVAL);
  ck_assert_ptr_null(t);
  /* Five dimensions are fine. */
  ck_assert_int_eq(sbn_tensor_new(5, shape, &t), SBN_OK);
  ck_assert_uint_eq(sbn_tensor_numel(t), 120);
  size_t other[2] = {7, 7};
  ck_assert_int_eq(sbn_tensor_reshape(t, 2, other), SBN_ESHAPE);
  ck_assert_int_eq(sbn_tensor_ndim(t), 5); /* unchanged */
  sbn_tensor *u;
  ck_assert_int_eq(sbn_tensor_new(2, other, &u), SBN_OK);
  ck_assert_int_eq(sbn_tensor_copy(u, t), SBN_ESHAPE);
  ck_assert_str_eq(sbn_last_error(),
                   "cannot copy tensor of shape (1, 2, 3, 4, 5) into one of shape (7, 7)");
  sbn_tensor_free(u);
  sbn_tensor_free(t);
}
END_TEST

START_TEST(test_empty_and_shape_str) {
  size_t shape[3] = {0, 4, 0};
  sbn_tensor *t;
  ck_assert_int_eq(sbn_tensor_new(3, shape, &t), SBN_OK);
  ck_assert_uint_eq(sbn_tensor_numel(t), 0);
  sbn_tensor_fill(t, 1.0f);
  char buf[32];
  ck_assert_str_eq(sbn_tensor_shape_str(t, buf, sizeof(buf)), "(0, 4, 0)");
  sbn_tensor_free(t);
  size_t one = 8;
  ck_assert_int_eq(sbn_tensor_new(1, &one, &t), SBN_OK);
  ck_assert_str_eq(sbn_tensor_shape_str(t, buf, sizeof(buf)), "(8,)");
  ck_assert_str_eq(sbn_tensor_shape_str(t, buf, 4), "(8,");
  sbn_tensor_free(t);
}
END_TEST

int main(void) {
  Suite *s = suite_create("tensor");
  TCase *tc = tcase_create("core");
  tcase_add_test(tc, test_new_is_zeroed);
  tcase_add_test(tc, test_from_data_copies);
  tcase_add_test(tc, test_view_shares_memory);
  tcase_add_test(tc, test_refcount);
  tcase_add_test(tc, test_grad_slot);
  tcase_add_test(tc, test_bad_shapes);
  tcase_add_test(tc, test_empty_and_shape_str);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
