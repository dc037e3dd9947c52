/*
 * sbn/status.h - status codes shared by libsbn-client and sbn-coordinator.
 *
 * Every fallible sbn function returns an int: SBN_OK (0) on success or one of
 * the negative SBN_E* codes below.  The same numbers travel on the wire in
 * Error and Reject messages, so a code the coordinator sends means the same
 * thing in the worker.  sbn_strerror() names a code; sbn_last_error() (see
 * sbn/sbn.h) gives the message of the last failure on the calling thread.
 *
 * This header has no dependencies and may be included on its own.
 */
#ifndef SBN_STATUS_H
#define SBN_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

/* Marks the functions exported from the shared library (built hidden). */
#ifndef SBN_API
#define SBN_API __attribute__((visibility("default")))
#endif

enum sbn_status {
  SBN_OK = 0,
  SBN_EINVAL = -1,      /* an argument is invalid (named in the message) */
  SBN_ENOMEM = -2,      /* out of memory */
  SBN_EIO = -3,         /* a socket or file operation failed */
  SBN_ETIMEDOUT = -4,   /* a blocking call or a round ran out of time */
  SBN_ECONNECT = -5,    /* could not connect to the coordinator */
  SBN_EPROTO = -6,      /* malformed frame or message */
  SBN_EVERSION = -7,    /* protocol versions disagree */
  SBN_EREJECTED = -8,   /* the coordinator refused this worker at hello */
  SBN_EPEERLOST = -9,   /* a member of the group disconnected or died */
  SBN_EMISMATCH = -10,  /* ranks disagree (channels, layer, phase, group) */
  SBN_ECLOSED = -11,    /* not connected, or the coordinator went away */
  SBN_ETOOBIG = -12,    /* a frame or payload exceeds a limit */
  SBN_ESHUTDOWN = -13,  /* the coordinator is shutting down */
  SBN_ENOTMEMBER = -14, /* this rank is not a member of the group */
  SBN_ESTATE = -15,     /* the call is not valid in the current state */
  SBN_EAUTH = -16,      /* authentication failed */
  SBN_EBADSTATS = -17,  /* a contribution holds NaN/Inf, negative M2 or count */
  SBN_ELIMIT = -18,     /* a configured resource limit was reached */
  SBN_EKEY = -19,       /* state_dict keys are missing or unexpected */
  SBN_ESHAPE = -20,     /* a tensor has the wrong rank, shape or size */
  SBN_EDUPLICATE = -21  /* this rank is already connected for the job */
};

/* The smallest (most negative) status code defined above. */
#define SBN_STATUS_MIN SBN_EDUPLICATE

/*
 * A static, lowercase description of a status code ("round timed out").
 * Unknown codes give "unknown status".  Never returns NULL; thread-safe.
 */
SBN_API const char *sbn_strerror(int status);

#ifdef __cplusplus
}
#endif

#endif /* SBN_STATUS_H */
