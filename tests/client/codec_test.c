/* p11p client tests — the codec through the generated stubs, without a socket: every
 * argument kind's request element and reply element (protocol/README.md "Argument
 * kinds"), the information structures, and the local checks made before anything is
 * sent. Templates, mechanisms and malformed replies are in their own files. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec_test.h"
#include "direct.h"
#include "find.h"

int checks, failures;

void check(int ok, const char *what, const char *file, int line)
{
	checks++;
	if (!ok) {
		failures++;
		fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what);
	}
}

void check_rv(CK_RV got, CK_RV want, const char *what, const char *file, int line)
{
	checks++;
	if (got != want) {
		failures++;
		fprintf(stderr, "%s:%d: FAILED: %s = 0x%lx, want 0x%lx\n", file, line, what, got, want);
	}
}

void check_req(const char *want, const char *file, int line)
{
	checks++;
	if (strcmp(fake_request, want) != 0) {
		failures++;
		fprintf(stderr, "%s:%d: FAILED: request\n   got  %s\n   want %s\n", file, line,
			fake_request, want);
	}
}

void reply(const char *text)
{
	msgpack_sbuffer_clear(&fake_reply);
	if (mp_from_text(text, &fake_reply) != 0) {
		fprintf(stderr, "bad reply text in the test: %s\n", text);
		exit(2);
	}
	strcpy(fake_request, "<no request>");
}

static void test_scalars(void)
{
	CK_ULONG n = 0;

	reply("[0]");
	CHECK_RV(p11p_wire_C_CloseAllSessions(5), CKR_OK);
	CHECK_REQ("[15,5]");
	CHECK_RV(p11p_wire_C_CloseAllSessions(~0UL), CKR_OK);
	CHECK_REQ("[15,18446744073709551615]");
	/* bbool: any true value travels as 1 */
	reply("[0,0]");
	CHECK_RV(C_GetSlotList(7, NULL, &n), CKR_OK);
	CHECK_REQ("[5,1,nil]");
	CHECK_RV(C_GetSlotList(CK_FALSE, NULL, &n), CKR_OK);
	CHECK_REQ("[5,0,nil]");
	/* the module's rv comes back unchanged */
	reply("[179]");
	CHECK_RV(p11p_wire_C_CloseAllSessions(1), CKR_SESSION_HANDLE_INVALID);
}

static void test_bytes(void)
{
	CK_BYTE data[] = "ab";
	CK_UTF8CHAR pin[] = "1234", label[32];

	reply("[0]");
	CHECK_RV(p11p_wire_C_DigestUpdate(1, data, 2), CKR_OK);
	CHECK_REQ("[40,1,h\"6162\"]");
	CHECK_RV(p11p_wire_C_DigestUpdate(1, data, 0), CKR_OK);
	CHECK_REQ("[40,1,h\"\"]");
	CHECK_RV(p11p_wire_C_DigestUpdate(1, NULL, 0), CKR_OK);
	CHECK_REQ("[40,1,nil]");
	CHECK_RV(p11p_wire_C_DigestUpdate(1, NULL, 5), CKR_OK); /* the module sees NULL, 5 */
	CHECK_REQ("[40,1,5]");
	CHECK_RV(p11p_wire_C_Login(3, CKU_USER, pin, 4), CKR_OK);
	CHECK_REQ("[19,3,1,h\"31323334\"]");
	CHECK_RV(p11p_wire_C_Login(3, CKU_USER, NULL, 0), CKR_OK); /* protected authentication path */
	CHECK_REQ("[19,3,1,nil]");
	CHECK_RV(p11p_wire_C_SetPIN(3, pin, 4, pin, 2), CKR_OK);
	CHECK_REQ("[12,3,h\"31323334\",h\"3132\"]");
	memset(label, 'L', sizeof label);
	CHECK_RV(p11p_wire_C_InitToken(0, pin, 4, label), CKR_OK);
	CHECK_REQ("[10,0,h\"31323334\",h\"4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c\"]");
	CHECK_RV(p11p_wire_C_InitToken(0, pin, 4, NULL), CKR_OK);
	CHECK_REQ("[10,0,h\"31323334\",nil]");
}

static void test_out_bytes(void)
{
	CK_BYTE in[3] = { 1, 2, 3 }, out[8];
	CK_ULONG len;

	/* length query: NULL buffer travels as nil, the length comes back */
	len = 99;
	reply("[0,256]");
	CHECK_RV(p11p_wire_C_Sign(1, in, 3, NULL, &len), CKR_OK);
	CHECK_REQ("[44,1,h\"010203\",nil]");
	CHECK(len == 256);
	/* a buffer travels as its capacity; the data comes back */
	len = sizeof out;
	memset(out, 0, sizeof out);
	reply("[0,h\"aabbcc\"]");
	CHECK_RV(p11p_wire_C_Sign(1, in, 3, out, &len), CKR_OK);
	CHECK_REQ("[44,1,h\"010203\",8]");
	CHECK(len == 3 && out[0] == 0xaa && out[2] == 0xcc && out[3] == 0);
	/* too small: the needed length */
	len = 2;
	reply("[336,64]");
	CHECK_RV(p11p_wire_C_Sign(1, in, 3, out, &len), CKR_BUFFER_TOO_SMALL);
	CHECK_REQ("[44,1,h\"010203\",2]");
	CHECK(len == 64);
	/* a non-NULL zero-capacity buffer is capacity 0, never a length query */
	len = 0;
	reply("[336,16]");
	CHECK_RV(p11p_wire_C_EncryptFinal(1, out, &len), CKR_BUFFER_TOO_SMALL);
	CHECK_REQ("[33,1,0]");
	CHECK(len == 16);
	len = 0;
	reply("[0,h\"\"]");
	CHECK_RV(p11p_wire_C_EncryptFinal(1, out, &len), CKR_OK);
	CHECK(len == 0);
	/* an error leaves the output alone, whatever came with it */
	len = 8;
	reply("[33,\"junk\"]");
	CHECK_RV(p11p_wire_C_Sign(1, in, 3, out, &len), CKR_DATA_LEN_RANGE);
	CHECK(len == 8);
	reply("[33]");
	CHECK_RV(p11p_wire_C_Sign(1, in, 3, out, &len), CKR_DATA_LEN_RANGE);
	/* a NULL length pointer is refused here: there is nothing to send */
	fake_roundtrips = 0;
	CHECK_RV(p11p_wire_C_Sign(1, in, 3, out, NULL), CKR_ARGUMENTS_BAD);
	CHECK_RV(p11p_wire_C_Sign(1, in, 3, NULL, NULL), CKR_ARGUMENTS_BAD);
	CHECK(fake_roundtrips == 0);
	/* the other out_bytes functions */
	len = sizeof out;
	reply("[0,h\"01\"]");
	CHECK_RV(C_WrapKey(1, NULL, 2, 3, out, &len), CKR_OK);
	CHECK_REQ("[61,1,nil,2,3,8]");
	CHECK(len == 1 && out[0] == 1);
	CHECK_RV(C_GetOperationState(1, out, &len), CKR_OK);
	CHECK_REQ("[17,1,1]");
}

static void test_out_random(void)
{
	CK_BYTE buf[4] = { 0x5a, 0x5a, 0x5a, 0x5a };

	reply("[0,h\"01020304\"]");
	CHECK_RV(p11p_wire_C_GenerateRandom(1, buf, 4), CKR_OK);
	CHECK_REQ("[65,1,4]");
	CHECK(buf[0] == 1 && buf[3] == 4);
	reply("[0,h\"\"]");
	buf[0] = 0x5a;
	CHECK_RV(p11p_wire_C_GenerateRandom(1, buf, 0), CKR_OK);
	CHECK_REQ("[65,1,0]");
	CHECK(buf[0] == 0x5a);
	reply("[7]");
	CHECK_RV(p11p_wire_C_GenerateRandom(1, NULL, 4), CKR_ARGUMENTS_BAD);
	CHECK_REQ("[65,1,nil]");
	/* fewer or more bytes than asked: malformed */
	reply("[0,h\"0102\"]");
	CHECK_RV(p11p_wire_C_GenerateRandom(1, buf, 4), CKR_DEVICE_ERROR);
	reply("[0,h\"0102030405\"]");
	CHECK_RV(p11p_wire_C_GenerateRandom(1, buf, 4), CKR_DEVICE_ERROR);
}

static void test_out_handles(void)
{
	CK_SESSION_HANDLE h = 0;
	CK_OBJECT_HANDLE pub = 0, priv = 0;
	CK_ULONG size = 0;
	CK_SLOT_ID slot = 0;

	reply("[0,42]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, &h), CKR_OK);
	CHECK_REQ("[13,3,4,0]");
	CHECK(h == 42);
	/* a NULL output pointer travels as nil: the module's CKR_ARGUMENTS_BAD comes back */
	reply("[7,nil]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, NULL), CKR_ARGUMENTS_BAD);
	CHECK_REQ("[13,3,4,nil]");
	reply("[0,10,11]");
	CHECK_RV(C_GenerateKeyPair(1, NULL, NULL, 0, NULL, 0, &pub, &priv), CKR_OK);
	CHECK_REQ("[60,1,nil,nil,nil,0,0]");
	CHECK(pub == 10 && priv == 11);
	reply("[0,1234]");
	CHECK_RV(C_GetObjectSize(1, 2, &size), CKR_OK);
	CHECK(size == 1234);
	reply("[0,18446744073709551615]");
	CHECK_RV(C_GetObjectSize(1, 2, &size), CKR_OK);
	CHECK(size == CK_UNAVAILABLE_INFORMATION);
	reply("[0,2]");
	CHECK_RV(C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, NULL), CKR_OK);
	CHECK_REQ("[68,1,0]");
	CHECK(slot == 2);
	reply("[8,nil]");
	CHECK_RV(C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, NULL), CKR_NO_EVENT);
	/* CKR_OK without the handle, or with a wrong type: malformed */
	reply("[0,nil]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, &h), CKR_DEVICE_ERROR);
	reply("[0]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, &h), CKR_DEVICE_ERROR);
	reply("[0,-1]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, &h), CKR_DEVICE_ERROR);
	reply("[0,\"42\"]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, &h), CKR_DEVICE_ERROR);
	reply("[0,h\"2a\"]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, &h), CKR_DEVICE_ERROR);
	reply("[0,4.0]");
	CHECK_RV(p11p_wire_C_OpenSession(3, CKF_SERIAL_SESSION, NULL, NULL, &h), CKR_DEVICE_ERROR);
	reply("[0,10,11,12]");
	CHECK_RV(C_GenerateKeyPair(1, NULL, NULL, 0, NULL, 0, &pub, &priv), CKR_DEVICE_ERROR);
	reply("[0,10]");
	CHECK_RV(C_GenerateKeyPair(1, NULL, NULL, 0, NULL, 0, &pub, &priv), CKR_DEVICE_ERROR);
}

static void test_out_lists(void)
{
	CK_SLOT_ID slots[3] = { 0 };
	CK_MECHANISM_TYPE mechs[2];
	CK_OBJECT_HANDLE objs[4] = { 0 };
	CK_ULONG n;

	n = 0;
	reply("[0,3]");
	CHECK_RV(C_GetSlotList(CK_TRUE, NULL, &n), CKR_OK);
	CHECK(n == 3);
	n = 3;
	reply("[0,[1,2,5]]");
	CHECK_RV(C_GetSlotList(CK_TRUE, slots, &n), CKR_OK);
	CHECK_REQ("[5,1,3]");
	CHECK(n == 3 && slots[0] == 1 && slots[2] == 5);
	n = 1;
	reply("[336,3]");
	CHECK_RV(C_GetSlotList(CK_TRUE, slots, &n), CKR_BUFFER_TOO_SMALL);
	CHECK(n == 3);
	n = 2;
	reply("[0,[1,2,3]]"); /* more than the capacity */
	CHECK_RV(C_GetSlotList(CK_TRUE, slots, &n), CKR_DEVICE_ERROR);
	n = 3;
	reply("[0,[1,\"2\"]]");
	CHECK_RV(C_GetSlotList(CK_TRUE, slots, &n), CKR_DEVICE_ERROR);
	n = 3;
	reply("[0,3]"); /* a count where the list was asked for */
	CHECK_RV(C_GetSlotList(CK_TRUE, slots, &n), CKR_DEVICE_ERROR);
	CHECK_RV(C_GetSlotList(CK_TRUE, slots, NULL), CKR_ARGUMENTS_BAD);
	n = 2;
	reply("[0,[4231,4232]]");
	CHECK_RV(C_GetMechanismList(1, mechs, &n), CKR_OK);
	CHECK_REQ("[8,1,2]");
	CHECK(n == 2 && mechs[0] == CKM_AES_GCM && mechs[1] == CKM_AES_CCM);
	reply("[0,[7,8]]");
	CHECK_RV(p11p_wire_C_FindObjects(1, objs, 4, &n), CKR_OK);
	CHECK_REQ("[28,1,4]");
	CHECK(n == 2 && objs[0] == 7 && objs[1] == 8 && objs[2] == 0);
	reply("[0,[]]");
	CHECK_RV(p11p_wire_C_FindObjects(1, objs, 4, &n), CKR_OK);
	CHECK(n == 0);
	reply("[0,[1,2,3,4,5]]");
	CHECK_RV(p11p_wire_C_FindObjects(1, objs, 4, &n), CKR_DEVICE_ERROR);
	CHECK_RV(p11p_wire_C_FindObjects(1, objs, 4, NULL), CKR_ARGUMENTS_BAD);
	reply("[7]");
	CHECK_RV(p11p_wire_C_FindObjects(1, NULL, 4, &n), CKR_ARGUMENTS_BAD);
	CHECK_REQ("[28,1,nil]");
}

static void test_structures(void)
{
	CK_SLOT_INFO slot;
	CK_TOKEN_INFO token;
	CK_MECHANISM_INFO mech;
	CK_SESSION_INFO session;
	char text[2048];

	memset(&slot, 0xff, sizeof slot);
	snprintf(text, sizeof text, "[0,[h\"%0128d\",h\"%064d\",7,[1,2],[3,4]]]", 0, 0);
	reply(text);
	CHECK_RV(C_GetSlotInfo(1, &slot), CKR_OK);
	CHECK_REQ("[6,1,0]");
	CHECK(slot.slotDescription[0] == 0 && slot.flags == 7 && slot.hardwareVersion.major == 1 &&
	      slot.hardwareVersion.minor == 2 && slot.firmwareVersion.minor == 4);

	memset(&token, 0xff, sizeof token);
	reply("[0,[h\"4141414141414141414141414141414141414141414141414141414141414141\","
	      "h\"4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d\","
	      "h\"6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d\",h\"73737373737373737373737373737373\","
	      "1037,1,2,3,4,5,6,7,8,9,10,[2,6],[1,0],h\"32303236313132323030303030303030\"]]");
	CHECK_RV(C_GetTokenInfo(1, &token), CKR_OK);
	CHECK(token.label[0] == 'A' && token.label[31] == 'A' && token.model[15] == 'm' &&
	      token.serialNumber[0] == 's' && token.flags == 1037 && token.ulMaxSessionCount == 1 &&
	      token.ulFreePrivateMemory == 10 && token.hardwareVersion.major == 2 &&
	      token.firmwareVersion.major == 1 && token.utcTime[0] == '2');
	/* a wrong size, a missing field, a version out of range: malformed, struct untouched */
	memset(&token, 0x11, sizeof token);
	reply("[0,[h\"41\",h\"\",h\"\",h\"\",1,1,2,3,4,5,6,7,8,9,10,[2,6],[1,0],h\"\"]]");
	CHECK_RV(C_GetTokenInfo(1, &token), CKR_DEVICE_ERROR);
	CHECK(token.label[0] == 0x11 && token.flags == 0x1111111111111111UL);
	memset(&mech, 0, sizeof mech);
	reply("[0,[256,4096,8193]]");
	CHECK_RV(C_GetMechanismInfo(1, CKM_RSA_PKCS_OAEP, &mech), CKR_OK);
	CHECK_REQ("[9,1,9,0]");
	CHECK(mech.ulMinKeySize == 256 && mech.ulMaxKeySize == 4096 && mech.flags == 8193);
	reply("[0,[256,4096]]");
	CHECK_RV(C_GetMechanismInfo(1, CKM_RSA_PKCS_OAEP, &mech), CKR_DEVICE_ERROR);
	reply("[0,[256,4096,1,2]]");
	CHECK_RV(C_GetMechanismInfo(1, CKM_RSA_PKCS_OAEP, &mech), CKR_DEVICE_ERROR);
	reply("[0,[1,3,6,0]]");
	CHECK_RV(p11p_wire_C_GetSessionInfo(9, &session), CKR_OK);
	CHECK(session.slotID == 1 && session.state == 3 && session.flags == 6 && session.ulDeviceError == 0);
	reply("[0,[1,3,6,[0]]]");
	CHECK_RV(p11p_wire_C_GetSessionInfo(9, &session), CKR_DEVICE_ERROR);
	snprintf(text, sizeof text, "[0,[h\"%0128d\",h\"%064d\",7,[256,2],[3,4]]]", 0, 0);
	reply(text);
	CHECK_RV(C_GetSlotInfo(1, &slot), CKR_DEVICE_ERROR);
	snprintf(text, sizeof text, "[0,[h\"%0128d\",h\"%064d\",7,[1,2,3],[3,4]]]", 0, 0);
	reply(text);
	CHECK_RV(C_GetSlotInfo(1, &slot), CKR_DEVICE_ERROR);
	reply("[7]");
	CHECK_RV(C_GetSlotInfo(1, NULL), CKR_ARGUMENTS_BAD);
	CHECK_REQ("[6,1,nil]");
}

/* out_info is answered locally by C_GetInfo; its decoder is checked directly. */
static void test_out_info_decoder(void)
{
	struct p11p_call c;
	CK_INFO info;

	memset(&c, 0, sizeof c);
	reply("[0,[[2,40],h\"7031317020202020202020202020202020202020202020202020202020202020\",0,"
	      "h\"6465736320202020202020202020202020202020202020202020202020202020\",[0,1]]]");
	c.reply = malloc(fake_reply.size);
	memcpy(c.reply, fake_reply.data, fake_reply.size);
	c.reply_len = fake_reply.size;
	p11p_reply_parse(&c, 1);
	p11p_get_out_info(&c, &info);
	CHECK_RV(c.err, CKR_OK);
	CHECK(info.cryptokiVersion.major == 2 && info.cryptokiVersion.minor == 40 &&
	      memcmp(info.manufacturerID, "p11p ", 5) == 0 && info.libraryVersion.minor == 1);
	p11p_codec_end(&c);
}

static void test_local_checks(void)
{
	CK_BYTE out[4];
	CK_ULONG len = 4;

	/* not initialised: refused before anything is encoded, whatever the arguments */
	fake_initialized = 0;
	fake_roundtrips = 0;
	CHECK_RV(p11p_wire_C_Sign(1, NULL, 0, out, NULL), CKR_CRYPTOKI_NOT_INITIALIZED);
	CHECK_RV(p11p_wire_C_CloseAllSessions(1), CKR_CRYPTOKI_NOT_INITIALIZED);
	CHECK(fake_roundtrips == 0);
	fake_initialized = 1;
	/* the round trip's own failure is the call's result */
	fake_transport_rv = CKR_DEVICE_ERROR;
	CHECK_RV(p11p_wire_C_Sign(1, NULL, 0, out, &len), CKR_DEVICE_ERROR);
	fake_transport_rv = CKR_CRYPTOKI_NOT_INITIALIZED;
	CHECK_RV(p11p_wire_C_Sign(1, NULL, 0, out, &len), CKR_CRYPTOKI_NOT_INITIALIZED);
	fake_transport_rv = CKR_OK;
	CHECK(len == 4);
}

/* A request carrying a PIN (kind pin: p11p_put_pin, as the stubs of C_Login, C_SetPIN,
 * C_InitPIN and C_InitToken put theirs) is wiped before its buffer is freed; bytes of
 * another kind are not. */
static void test_pin_wiped(void)
{
	static const CK_UTF8CHAR pin[] = "s3cr3t-p1n";

	for (int secret = 0; secret < 2; secret++) {
		struct p11p_call c;
		int found = 0;

		memset(&c, 0, sizeof c);
		p11p_codec_begin(&c, secret ? 19 : 44, 1); /* C_Login, C_Sign */
		if (secret)
			p11p_put_pin(&c, pin, sizeof pin - 1);
		else
			p11p_put_bytes(&c, pin, sizeof pin - 1);
		CHECK(c.err == CKR_OK && c.req.data != NULL);
		p11p_codec_wipe(&c);
		for (size_t k = 0; k + sizeof pin - 1 <= c.req.size; k++)
			found |= memcmp(c.req.data + k, pin, sizeof pin - 1) == 0;
		CHECK(found == !secret);
		p11p_codec_end(&c);
	}
}

void test_kinds(void)
{
	test_pin_wiped();
	test_scalars();
	test_bytes();
	test_out_bytes();
	test_out_random();
	test_out_handles();
	test_out_lists();
	test_structures();
	test_out_info_decoder();
	test_local_checks();
}

int main(int argc, char **argv)
{
	long fuzz_rounds = argc > 1 ? atol(argv[1]) : 20000;

	msgpack_sbuffer_init(&fake_reply);
	test_kinds();
	test_templates();
	test_mechanisms();
	test_malformed();
	if (fuzz_rounds > 0) {
		extern long fuzz_iterations;

		fuzz_iterations = fuzz_rounds;
		test_fuzz();
	}
	CHECK(fake_in_flight == 0); /* every call left what it entered */
	msgpack_sbuffer_destroy(&fake_reply);
	printf("codec test: %d checks, %d failed\n", checks, failures);
	return failures ? 1 : 0;
}
