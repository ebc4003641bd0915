/* p11p — Cryptoki parameter structures that p11-kit's pkcs11.h (v2.40) lacks.
 * Shared by the C client and the helper's cffi build; layouts as in PKCS#11 v2.40/3.0. */
#ifndef P11P_EXTRA_H
#define P11P_EXTRA_H
#include <p11-kit/pkcs11.h>

typedef struct P11P_CCM_PARAMS {
  CK_ULONG data_len;
  CK_BYTE_PTR nonce_ptr;
  CK_ULONG nonce_len;
  CK_BYTE_PTR aad_ptr;
  CK_ULONG aad_len;
  CK_ULONG mac_len;
} P11P_CCM_PARAMS;

typedef struct P11P_EDDSA_PARAMS {
  CK_BBOOL ph_flag;
  CK_ULONG context_data_len;
  CK_BYTE_PTR context_data;
} P11P_EDDSA_PARAMS;

#endif
